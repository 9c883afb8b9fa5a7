"""KTO (Ethayarajh et al. 2024) on unpaired feedback: each completion is only marked
desirable or not, the form thumbs-up/down data comes in, so no pairs are needed.

The loss compares each completion's policy/reference log-ratio with a reference point,
the batch's KL estimate, measured (as TRL does) on mismatched examples: each prompt
with another example's completion. Here example i is matched with example i + 1's
completion, a fixed pairing, so the reference log-probs of both the matched and the
mismatched sequences are computed once before training like DPO's; a batch's rows
interleave them (2i matched, 2i + 1 mismatched).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.adapt.dpo import (
    _messages,
    _reply,
    make_batch,
    reference_logps,
    run_key,
    sequence_logps,
    split_pairs,
    train_pairs_loop,
)
from lmlab.adapt.preference import kto_kl, kto_loss
from lmlab.adapt.records import iter_records
from lmlab.config import STRICT, Fraction, PosFloat
from lmlab.errors import UsageError
from lmlab.model.adapter_ops import with_adapter
from lmlab.model.adapters import PeftConfig
from lmlab.model.loading import as_checkpoint, load_model
from lmlab.model.scoring import IGNORE
from lmlab.tokenizer import load_tokenizer, pad_id
from lmlab.tokenizer.chat import encode_exchange
from lmlab.train.batch import Batch, LossOut, logits_of
from lmlab.train.loop import TrainConfig
from lmlab.utils import claim_output_dir


@dataclass
class KTOConfig:
    """TRL's defaults: beta 0.1, both weights 1 (raise one to balance a skewed set)."""

    __pydantic_config__ = STRICT

    beta: PosFloat = 0.1
    desirable_weight: PosFloat = 1.0
    undesirable_weight: PosFloat = 1.0
    heldout: Fraction = 0.1


@dataclass
class Feedback:
    messages: list[dict[str, str]]
    completion: str
    desirable: bool


def read_feedback(path: str | Path) -> list[Feedback]:
    """Unpaired feedback in TRL's conventions: `prompt`, `completion` (strings or chat
    messages) and a boolean `label`, from JSONL, Parquet, CSV or `hf:NAME`. A bad line is
    a `UsageError` naming file, line and field."""
    out = []
    for where, rec in iter_records(path, "prompt", "feedback"):
        for field in ("prompt", "completion", "label"):
            if field not in rec:
                raise UsageError(f"{where}: field {field!r} is missing")
        if not isinstance(rec["label"], bool):
            raise UsageError(f"{where}: field 'label' must be true or false")
        out.append(
            Feedback(
                _messages(rec["prompt"], where, "prompt"),
                _reply(rec["completion"], where, "completion"),
                rec["label"],
            )
        )
    if len(out) < 2:
        raise UsageError(f"{path}: KTO needs at least 2 examples (the KL uses mismatched ones)")
    return out


def _row(tok, messages, reply) -> tuple[list[int], list[int]]:
    prompt, ids = encode_exchange(tok, messages, reply)
    return prompt + ids, [IGNORE] * len(prompt) + ids


def kto_objective(cfg: KTOConfig):
    """KTO's loss over a batch of (matched, mismatched) rows, counted in examples."""

    def objective(model: torch.nn.Module, batch: Batch) -> LossOut:
        if batch.ref_logps is None or batch.extras is None:
            raise UsageError("kto: the batch carries no reference log-probs or labels")
        logps, _ = sequence_logps(logits_of(model, batch), batch.targets)
        ref = batch.ref_logps.to(logps.dtype)
        kl = kto_kl(logps[1::2], ref[1::2])
        good = batch.extras["desirable"].bool()
        losses = kto_loss(
            logps[0::2], ref[0::2], good, kl, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight
        )
        rewards = cfg.beta * (logps[0::2] - ref[0::2]).detach()
        metrics = {
            "kl": kl * good.numel(),
            "reward_desirable": rewards[good].sum(),
            "reward_undesirable": rewards[~good].sum(),
        }
        return LossOut(losses.sum(), good.numel(), metrics)

    return objective


def align_kto(
    model_ref: str | Path,
    data: list[str | Path],
    out_dir: str | Path,
    kto: KTOConfig,
    cfg: TrainConfig,
    seed: int = 0,
    one_pass: bool = False,
    peft: PeftConfig | None = None,
) -> dict:
    """Train `model_ref` with KTO on unpaired feedback; an ordinary checkpoint results."""
    out_dir = claim_output_dir(out_dir, "align-kto", resume=True)  # before any work
    examples = [e for path in data for e in read_feedback(path)]
    with as_checkpoint(model_ref, scratch=out_dir.parent) as ckpt:
        tok = load_tokenizer(ckpt)
        model = with_adapter(load_model(ckpt), peft, model_ref, tok)
        n = len(examples)
        encoded = [
            (
                _row(tok, e.messages, e.completion),
                _row(tok, e.messages, examples[(i + 1) % n].completion),  # mismatched
                e.desirable,
            )
            for i, e in enumerate(examples)
        ]
        train_part, held = split_pairs(encoded, kto.heldout, seed, "kto")
        pad = pad_id(tok)
        refs = {
            name: reference_logps(
                model, [r for m, mm, _ in part for r in (m, mm)], pad, cfg.seq_len, 8, cfg.precision
            )
            if part
            else torch.zeros(0)
            for name, part in (("train", train_part), ("held", held))
        }

        def batch_of(indices: list[int], is_held: bool) -> Batch:
            part, ref = (held, refs["held"]) if is_held else (train_part, refs["train"])
            rows = [r for i in indices for r in part[i][:2]]
            picked = torch.cat([ref[2 * i : 2 * i + 2] for i in indices])
            b = make_batch(rows, picked, pad, cfg.seq_len)
            b.extras = {"desirable": torch.tensor([part[i][2] for i in indices])}
            return b

        return train_pairs_loop(
            "kto", model, len(train_part), len(held), batch_of, kto_objective(kto),
            cfg, out_dir, ckpt, run_key("kto", kto, data, seed), seed, one_pass,
        )  # fmt: skip
