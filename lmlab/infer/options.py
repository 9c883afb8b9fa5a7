"""`GenerationConfig`: every decoding option, its default and its help text, written once.

`lmlab generate`, `chat` and `judge` build their flags from these fields (name, default,
help), so the command line and the Python API cannot drift apart. The module imports no
torch, so the command line reads it without paying for torch at start-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmlab.errors import UsageError


def parse_early_stopping(text: str) -> bool | str:
    """`--early-stopping` as given on the command line: true, false or never."""
    table = {"true": True, "false": False, "never": "never"}
    if text.lower() not in table:
        raise UsageError(f"--early-stopping {text}: use true, false or never")
    return table[text.lower()]


SCHEMES = ("lefthash", "selfhash")


@dataclass
class WatermarkConfig:
    """The KGW watermark (Kirchenbauer et al. 2023): before each pick, a pseudo-random
    "green" fraction `gamma` of the vocabulary, seeded by the previous token (`lefthash`) or
    by the candidate token itself (`selfhash`), gets `delta` added to its logits, so that
    anyone who knows `hashing_key` can count green tokens and test for the watermark. The
    defaults and the seeding are transformers' `WatermarkingConfig`'s, so either detects
    the other's text. Kept here, free of torch, so the command line can build one."""

    gamma: float = 0.25
    delta: float = 2.0
    seeding_scheme: str = "lefthash"
    hashing_key: int = 15485863  # the millionth prime, as the paper's reference code
    context_width: int = 1

    def validate(self) -> WatermarkConfig:
        checks = [
            (0 < self.gamma < 1, "gamma must be in (0, 1)"),
            (math.isfinite(self.delta) and self.delta >= 0, "delta must be finite and >= 0"),
            (self.seeding_scheme in SCHEMES, f"scheme must be one of {', '.join(SCHEMES)}"),
            # the seed is computed in int64, as transformers does
            (0 <= self.hashing_key < 2**63, "key must be in [0, 2**63)"),
            (self.context_width >= 1, "context width must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(f"watermark: {msg}")
        return self


def _opt(default, help: str, **more):
    """A field with its help text; `flags` names the CLI flags when they are not the field's
    own name, `parse` turns the flag's text into the value, `cli=False` keeps it off the CLI."""
    meta = {"help": help, **more}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class GenerationConfig:
    """Every decoding option of `lmlab generate`; defaults are plain greedy decoding, at most
    100 new tokens (the command line's long-standing default). The fields are in the order
    `lmlab generate --help` lists them."""

    temperature: float = _opt(0.0, "0 = greedy; > 0 samples.")
    top_p: float = _opt(1.0, "Nucleus sampling mass (1 = off).")
    top_k: int = _opt(0, "Sample among the k likeliest (0 = off).")
    min_p: float = _opt(0.0, "Drop tokens below min-p x the top one.")
    repetition_penalty: float = _opt(1.0, "CTRL penalty (1 = off).")
    presence_penalty: float = _opt(0.0, "Minus this once seen.")
    frequency_penalty: float = _opt(0.0, "Minus this per use.")
    no_repeat_ngram_size: int = _opt(0, "Never repeat an n-gram.")
    max_new_tokens: int = _opt(100, "Generation length limit.")
    stop_ids: list[int] = _opt([], "Stop token ids (EOS, end of turn).", cli=False)
    stop_strings: list[str] = _opt([], "Stop string (repeatable).", flags=("--stop",))
    n: int = _opt(1, "Samples per prompt.", flags=("-n", "--n"))
    num_beams: int = _opt(1, "Beam search width (1 = off).")
    length_penalty: float = _opt(1.0, "Beam score / length^this.")
    early_stopping: bool | str = _opt(
        False, "Beams: true, false or never.", parse=parse_early_stopping
    )
    num_return_sequences: int = _opt(1, "Beams: the n best.")
    logit_bias: dict[int, float] = _opt(
        {}, "Added to these token ids' logits before any choice.", cli=False
    )
    logprobs: int | None = _opt(None, "Report log-probs of the chosen and top-k tokens.")
    seed: int | None = _opt(None, "Seed for sampling.")
    compile: bool = _opt(
        False, "torch.compile the decode step (static KV cache): a minute once, then faster."
    )
    watermark: WatermarkConfig | None = _opt(
        None, "KGW watermark (lmlab generate --watermark builds it).", cli=False
    )

    def validate(self) -> GenerationConfig:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)"),
            (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be >= 0"),
            (self.n >= 1, "n must be >= 1"),
            (self.num_beams >= 1, "num_beams must be >= 1"),
            (
                1 <= self.num_return_sequences <= self.num_beams or self.num_beams == 1,
                "num_return_sequences must be between 1 and num_beams",
            ),
            (
                self.early_stopping in (True, False, "never"),
                "early_stopping must be true, false or 'never'",
            ),
            (self.logprobs is None or self.logprobs >= 0, "logprobs must be >= 0"),
            (all(s for s in self.stop_strings), "stop strings must not be empty"),
            (
                all(-100 <= v <= 100 for v in self.logit_bias.values()),
                "logit_bias values must be in [-100, 100]",
            ),
        ]
        for ok, msg in checks:
            if not ok:  # named as the CLI flags are (--top-p)
                raise UsageError(f"generation: {msg.replace('_', '-')}")
        if self.watermark is not None:
            if not isinstance(self.watermark, WatermarkConfig):
                raise UsageError("generation: watermark must be a WatermarkConfig")
            self.watermark.validate()
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def has_penalties(self) -> bool:
        """Whether anything reshapes the logits before the pick (penalties, a logit bias, a
        watermark): then each row's history is kept and `apply_penalties` runs."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.no_repeat_ngram_size > 0
            or bool(self.logit_bias)
            or self.watermark is not None
        )
