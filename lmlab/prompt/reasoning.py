"""Chain of thought and self-consistency (Zhao et al. §6.3): the zero-shot trigger that
makes a model write its reasoning, and the vote over the answers of several sampled
chains (Wang et al. 2023)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

from lmlab.errors import UsageError
from lmlab.prompt.answers import INVALID

ZERO_SHOT_COT = "Let's think step by step."  # Kojima et al. 2022


def majority_vote(
    answers: Sequence[str | None], ignore: Collection[str] = (INVALID,)
) -> str | None:
    """Self-consistency: the most frequent extracted answer.

    None (no answer found) never votes; answers in `ignore` (failed extractions) vote only
    when nothing else is left; None when no sample has an answer at all. Ties go to the
    answer that appears first in `answers` (the order samples were drawn), which is also
    what lm-eval's `majority_vote` filter does, so the vote is deterministic. An empty
    `answers` is an error: there was nothing to sample."""
    if not answers:
        raise UsageError("majority_vote: no answers to vote over")
    found = [a for a in answers if a is not None]
    valid = [a for a in found if a not in ignore] or found
    if not valid:
        return None
    counts = Counter(valid)  # insertion-ordered: the first-seen answer wins a tie
    return max(counts, key=counts.__getitem__)
