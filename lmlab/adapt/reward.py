"""Reward models (InstructGPT's RLHF, Zhao et al. §5.2): a decoder with a scalar head,
trained on preference pairs with the Bradley–Terry loss, so that a chosen reply scores
higher than the rejected one.

The head (`ModelConfig.reward_head`: a linear `score` on the final hidden state) reads a
sequence at its last real token, the rightmost one that is not padding: the rule of
Hugging Face's `...ForSequenceClassification`, so an exported reward model scores the same
in transformers. The head starts at zero, so every score is 0 and the loss is exactly
ln 2 at step 0; the decoder underneath starts from the given checkpoint (an SFT model,
usually).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.adapt.dpo import (
    encode_pair,
    read_pairs,
    run_key,
    split_pairs,
    train_pairs_loop,
)
from lmlab.adapt.preference import reward_model_loss
from lmlab.config import STRICT, Fraction, NonNegFloat
from lmlab.errors import UsageError
from lmlab.model.adapter_ops import with_adapter
from lmlab.model.adapters import PeftConfig
from lmlab.model.loading import as_checkpoint, load_model
from lmlab.model.transformer import Transformer, with_score_head
from lmlab.tokenizer import load_tokenizer, pad_id
from lmlab.train.batch import Batch, LossOut
from lmlab.train.loop import TrainConfig
from lmlab.utils import claim_output_dir


@dataclass
class RewardConfig:
    """TRL's `center_rewards_coefficient` (None: off) and the held-out share of pairs."""

    __pydantic_config__ = STRICT

    center_coefficient: NonNegFloat | None = None
    heldout: Fraction = 0.1


def with_reward_head(model: Transformer) -> Transformer:
    """The same decoder with a zero-initialised scalar head."""
    if model.cfg.family != "decoder":
        raise UsageError(f"reward model: family {model.cfg.family!r}; only decoders get a head")
    return with_score_head(model)


def score_positions(ids: torch.Tensor, pad: int) -> torch.Tensor:
    """Each row's last token that is not padding (transformers' rule)."""
    real = (ids != pad).long()
    return (torch.arange(ids.shape[1], device=ids.device) * real).argmax(-1)


def collate_full(rows: list[list[int]], pad: int, seq_len: int) -> Batch:
    """Whole sequences, right-padded (cut to `seq_len`); targets mark the real tokens,
    which the loop counts as the batch's tokens."""
    length = min(max(len(r) for r in rows), seq_len)
    x = torch.full((len(rows), length), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        r = r[:length]
        x[i, : len(r)] = torch.tensor(r)
    return Batch(x, torch.where(x == pad, -100, x))


def reward_objective(pad: int, cfg: RewardConfig):
    """Bradley–Terry on interleaved rows (2i chosen, 2i + 1 rejected), counted in pairs,
    with each pair's `margin` (batch extras) where the data gave margins; logs the mean
    scores, their margin and the pairwise accuracy."""

    def objective(model: torch.nn.Module, batch: Batch) -> LossOut:
        scores = model(batch.inputs, score_at=score_positions(batch.inputs, pad)).float()
        chosen, rejected = scores[0::2], scores[1::2]
        pairs = chosen.numel()
        given = (batch.extras or {}).get("margin")
        loss = reward_model_loss(
            chosen,
            rejected,
            margin=None if given is None else given[0::2].float(),
            center_coefficient=cfg.center_coefficient,
        )
        margin = (chosen - rejected).detach()
        metrics = {
            "score_chosen": chosen.detach().sum(),
            "score_rejected": rejected.detach().sum(),
            "score_margin": margin.sum(),
            "pair_accuracy": (margin > 0).float().sum(),
        }
        return LossOut(loss * pairs, pairs, metrics)

    return objective


@torch.no_grad()
def score_texts(model: Transformer, rows: list[list[int]], pad: int, seq_len: int) -> torch.Tensor:
    """Scores of token sequences (already in the chat template) by a reward model."""
    model.eval()
    out = []
    for i in range(0, len(rows), 8):
        b = collate_full(rows[i : i + 8], pad, seq_len)
        out.append(model(b.inputs, score_at=score_positions(b.inputs, pad)))
    return torch.cat(out)


def align_rm(
    model_ref: str | Path,
    data: list[str | Path],
    out_dir: str | Path,
    rm: RewardConfig,
    cfg: TrainConfig,
    seed: int = 0,
    one_pass: bool = False,
    peft: PeftConfig | None = None,
) -> dict:
    """Train a reward model from `model_ref` on the pairs of `data`; the result under
    `out_dir/model` is a checkpoint with `reward_head: true`, which `load_model` loads and
    `lmlab export --to hf` writes as a sequence-classification model. With `peft` it is
    an adapter (PEFT's SEQ_CLS layout: the new head trains and is saved with it)."""
    out_dir = claim_output_dir(out_dir, "align-rm", resume=True)  # before any work
    pairs = [p for path in data for p in read_pairs(path)]
    with as_checkpoint(model_ref, scratch=out_dir.parent) as ckpt:
        tok = load_tokenizer(ckpt)
        base = load_model(ckpt)
        model = base if base.cfg.reward_head else with_reward_head(base)
        model = with_adapter(model, peft, model_ref, tok)
        margins = [p.margin for p in pairs]
        if any(m is not None for m in margins) and None in margins:
            raise UsageError("rm: some pairs have a 'margin' and some do not; give all or none")
        with_margin = margins[0] is not None
        # each pair: its two rows, and its margin (0 where the data gives none)
        encoded = [([ids for ids, _ in encode_pair(tok, p)], p.margin or 0.0) for p in pairs]
        train_rows, held = split_pairs(encoded, rm.heldout, seed, "rm")
        pad = pad_id(tok)

        def batch_of(indices: list[int], is_held: bool) -> Batch:
            part = held if is_held else train_rows
            batch = collate_full([r for i in indices for r in part[i][0]], pad, cfg.seq_len)
            if with_margin:
                # per row, as extras are (slicing rows keeps pairs whole): both rows of a pair
                m = torch.tensor([part[i][1] for i in indices])
                batch.extras = {"margin": m.repeat_interleave(2)}
            return batch

        key = run_key("rm", rm, data, seed)
        return train_pairs_loop(
            "rm", model, len(train_rows), len(held), batch_of, reward_objective(pad, rm),
            cfg, out_dir, ckpt, key, seed, one_pass,
        )  # fmt: skip
