"""Preference optimisation on the training loop's loss seam: preference pairs in TRL's
conventions, the reference model's log-probabilities computed once, and the DPO family's
losses (`lmlab.adapt.preference`) as the objective; SimPO and ORPO, which need no
reference, on the same pairs.

Why cache the reference: DPO compares the policy with the model it started from on the
same pairs. Those log-probs never change, so they are computed in one pass before
training and carried in each batch (`Batch.ref_logps`); the reference model is never
held in memory beside the policy, which halves the weights in memory and skips a forward
per step. Because the objective is a `LossFn`, exact resume, spike rollback, gradient
accumulation, logging and DDP hold as they do for pre-training and SFT.

Rows of a batch interleave the pairs: row 2i is pair i's chosen completion, 2i + 1 its
rejected one, so that any contiguous even slice (a data-parallel rank's) keeps pairs whole.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tokenizers import Tokenizer

from lmlab.adapt.preference import dpo_loss, orpo_odds_ratio, simpo_loss
from lmlab.adapt.records import iter_records
from lmlab.adapt.sft import collate
from lmlab.config import STRICT, Fraction, NonNegFloat, PosFloat
from lmlab.console import log
from lmlab.errors import UsageError
from lmlab.model.adapter_ops import with_adapter
from lmlab.model.adapters import PeftConfig, adapter_disabled, reference_copy
from lmlab.model.loading import as_checkpoint, load_model
from lmlab.model.precision import autocast
from lmlab.model.scoring import IGNORE
from lmlab.tokenizer import load_tokenizer, pad_id
from lmlab.tokenizer.chat import encode_exchange
from lmlab.train.batch import Batch, LossOut, logits_of
from lmlab.train.loop import TrainConfig, train
from lmlab.utils import claim_output_dir, mark_output


@dataclass
class DPOConfig:
    """The preference loss (defaults as TRL's: sigmoid DPO, beta 0.1) and the held-out
    share of the pairs that the validation loss is measured on."""

    __pydantic_config__ = STRICT

    beta: PosFloat = 0.1
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo", "simpo", "orpo"] = "sigmoid"
    label_smoothing: Fraction = 0.0  # > 0: conservative DPO (sigmoid) or robust DPO
    simpo_gamma: NonNegFloat = 0.5  # SimPO's target reward margin
    heldout: Fraction = 0.1
    # cached: the reference's log-probs computed once before training (no second model);
    # live: a frozen copy of the start scores every batch (what DPO trainers usually do;
    # kept to measure what the cache saves)
    reference: Literal["cached", "live"] = "cached"

    @property
    def reference_free(self) -> bool:
        """SimPO and ORPO need no reference model at all."""
        return self.loss_type in ("simpo", "orpo")


@dataclass
class Pair:
    """A prompt as chat messages and the two completions (assistant replies)."""

    messages: list[dict[str, str]]
    chosen: str
    rejected: str
    margin: float | None = None  # TRL's `margin` column: how much better chosen is (RM only)


# --- preference files ---------------------------------------------------------------------


def _messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if not ok:
        raise UsageError(
            f'{where}: field {field!r} must be a string or a list of {{"role", "content"}} messages'
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _reply(value: Any, where: str, field: str) -> str:
    """A completion: a string, or (TRL's conversational form) one assistant message."""
    if isinstance(value, str):
        return value
    turns = _messages(value, where, field)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise UsageError(f"{where}: field {field!r} must hold exactly one assistant message")
    return turns[0]["content"]


def read_pairs(path: str | Path) -> list[Pair]:
    """Paired preferences in TRL's conventions: `prompt`, `chosen`, `rejected`, each a
    string or (JSONL) a list of chat messages (the prompt a conversation, each completion
    one assistant message); a string prompt is one user turn. JSONL, Parquet, CSV or
    `hf:NAME` (`lmlab.adapt.records`). A bad line is a `UsageError` naming the file, the
    line and the field. An optional numeric `margin` is kept (the reward model's loss
    uses it)."""
    pairs = []
    for where, rec in iter_records(path, "prompt", "preference"):
        for field in ("prompt", "chosen", "rejected"):
            if field not in rec:
                raise UsageError(f"{where}: field {field!r} is missing")
        margin = rec.get("margin")
        if margin is not None and (
            isinstance(margin, bool)
            or not isinstance(margin, (int, float))
            or not math.isfinite(margin)
        ):
            raise UsageError(f"{where}: field 'margin' must be a finite number, got {margin!r}")
        pairs.append(
            Pair(
                _messages(rec["prompt"], where, "prompt"),
                _reply(rec["chosen"], where, "chosen"),
                _reply(rec["rejected"], where, "rejected"),
                None if margin is None else float(margin),
            )
        )
    if not pairs:
        raise UsageError(f"{path}: no preference pairs")
    return pairs


# --- tokens, batches and log-probabilities ----------------------------------------------------


def encode_pair(tok: Tokenizer, pair: Pair) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of the chosen and the rejected exchange in the model's own chat
    template; the prompt's labels are masked, each reply and its end of turn learned."""
    rows = []
    for reply in (pair.chosen, pair.rejected):
        prompt, ids = encode_exchange(tok, pair.messages, reply)
        rows.append((prompt + ids, [IGNORE] * len(prompt) + ids))
    return rows


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The log-probability of each target token [B, T] (0 where there is no target)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (targets != IGNORE)


def sequence_logps(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its targets, and how many there are."""
    return token_logps(logits, targets).sum(-1), (targets != IGNORE).sum(-1)


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    rows: list[tuple[list[int], list[int]]],
    pad: int,
    seq_len: int,
    batch: int = 8,
    precision: str = "fp32",
) -> torch.Tensor:
    """The model's summed log-probs of every row's completion, before any update (as its
    base computes them: a fresh adapter's virtual tokens set aside), at the training's
    `precision`: under bf16 autocast the policy's first log-probs differ from fp32 ones, and
    the DPO loss would not start at log 2 with the policy equal to its reference."""
    was = model.training
    model.eval()
    out = []
    device = next(model.parameters()).device
    with adapter_disabled(model), autocast(precision, device):
        for i in range(0, len(rows), batch):
            x, y = collate(rows[i : i + batch], pad, seq_len)
            out.append(sequence_logps(model(x), y)[0])
    model.train(was)
    return torch.cat(out)


def dpo_objective(cfg: DPOConfig, ref_model: torch.nn.Module | None = None):
    """The loss seam's objective: the DPO-family loss summed over a batch's pairs, counted
    in pairs; the implicit rewards logged (chosen, rejected, margin, accuracy). With
    `ref_model` the reference log-probs are computed per batch instead of read from it."""

    def objective(model: torch.nn.Module, batch: Batch) -> LossOut:
        logps, lengths = sequence_logps(logits_of(model, batch), batch.targets)
        if ref_model is not None:
            with torch.no_grad():
                batch.ref_logps = sequence_logps(logits_of(ref_model, batch), batch.targets)[0]
        if cfg.reference_free:
            avg = logps / lengths.clamp(min=1)  # both use per-token averages
            if cfg.loss_type == "simpo":
                out = simpo_loss(
                    avg[0::2], avg[1::2], cfg.beta, cfg.simpo_gamma, cfg.label_smoothing
                )
            else:  # orpo: the chosen side's SFT loss plus the odds-ratio term
                out = orpo_odds_ratio(avg[0::2], avg[1::2], cfg.beta)
                out.losses = out.losses - avg[0::2]
        else:
            if batch.ref_logps is None:
                raise UsageError("dpo: the batch carries no reference log-probs")
            ref = batch.ref_logps.to(logps.dtype)
            out = dpo_loss(
                logps[0::2],
                logps[1::2],
                ref[0::2],
                ref[1::2],
                beta=cfg.beta,
                loss_type=cfg.loss_type,
                label_smoothing=cfg.label_smoothing,
                chosen_lengths=lengths[0::2],
                rejected_lengths=lengths[1::2],
            )
        margin = out.chosen_rewards - out.rejected_rewards
        metrics = {
            "reward_chosen": out.chosen_rewards.sum(),
            "reward_rejected": out.rejected_rewards.sum(),
            "reward_margin": margin.sum(),
            "reward_accuracy": (margin > 0).float().sum(),
        }
        return LossOut(out.losses.sum(), out.losses.numel(), metrics)

    return objective


def make_batch(
    rows: list[tuple[list[int], list[int]]], ref: torch.Tensor, pad: int, seq_len: int
) -> Batch:
    x, y = collate(rows, pad, seq_len)
    return Batch(x, y, ref_logps=ref)


@functools.lru_cache(maxsize=4)
def _order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


# --- training on pairs (DPO here, the reward model in reward.py) --------------------------------


def split_pairs(encoded: list, heldout: float, seed: int, what: str) -> tuple[list, list]:
    """(training, held-out) pairs: a seeded share held out for the validation loss."""
    order = np.random.default_rng(seed).permutation(len(encoded))
    n_held = int(round(heldout * len(encoded))) if len(encoded) > 1 else 0
    held = [encoded[i] for i in order[:n_held]]
    train_pairs = [encoded[i] for i in order[n_held:]]
    if not train_pairs:
        raise UsageError(f"{what}: no pairs left to train on (lower heldout or add data)")
    return train_pairs, held


def train_pairs_loop(
    what: str,
    model: torch.nn.Module,
    n_train: int,
    n_held: int,
    batch_of: Callable[[list[int], bool], Batch],
    objective,
    cfg: TrainConfig,
    out_dir: Path,
    tokenizer_dir: Path,
    key: str,
    seed: int,
    one_pass: bool,
) -> dict:
    """The training loop over pairs in a seeded order per epoch; `batch_of(indices,
    held)` makes the batch of those training (or held-out) pairs."""
    if one_pass:
        cfg.max_steps = max(1, n_train // cfg.batch_size)

    def get_batch(_index: int, start: int, count: int) -> Batch:
        picked = []
        for r in range(start, start + count):
            epoch, k = divmod(r, n_train)
            picked.append(int(_order(seed, epoch, n_train)[k]))
        return batch_of(picked, False)

    bs = cfg.batch_size
    vals = [
        batch_of(list(range(i, min(i + bs, n_held))), True)
        for i in range(0, min(n_held, bs * cfg.eval_batches), bs)
    ]
    log(f"{what}: {n_train} training pairs, {n_held} held out, {cfg.budget}")
    out_dir.mkdir(parents=True, exist_ok=True)
    mark_output(out_dir, f"align-{what}")  # a later run resumes it; nothing else may
    summary = train(
        model, get_batch, vals, cfg, out_dir, tokenizer_dir, key, name=what, objective=objective
    )
    summary["pairs"] = n_train
    return summary


def run_key(what: str, config: object, data: list, seed: int) -> str:
    return json.dumps(
        {what: config.__dict__, "data": [str(p) for p in data], "seed": seed}, sort_keys=True
    )


def align_dpo(
    model_ref: str | Path,
    data: list[str | Path],
    out_dir: str | Path,
    dpo: DPOConfig,
    cfg: TrainConfig,
    seed: int = 0,
    one_pass: bool = False,
    peft: PeftConfig | None = None,
) -> dict:
    """Train `model_ref` (any form lmlab loads) with DPO on the pairs of `data`; the result
    is an ordinary checkpoint under `out_dir/model`. `one_pass`: as many steps as one pass
    over the training pairs takes (replacing `cfg.max_steps`)."""
    out_dir = claim_output_dir(out_dir, "align-dpo", resume=True)  # before any work
    pairs = [p for path in data for p in read_pairs(path)]
    with as_checkpoint(model_ref, scratch=out_dir.parent) as ckpt:
        tok = load_tokenizer(ckpt)
        model = with_adapter(load_model(ckpt), peft, model_ref, tok)
        encoded = [encode_pair(tok, p) for p in pairs]
        too_long = sum(max(len(ids) for ids, _ in e) > cfg.seq_len + 1 for e in encoded)
        if too_long:
            log(f"dpo: {too_long} of {len(pairs)} pairs are longer than seq_len={cfg.seq_len}: cut")
        train_pairs, held = split_pairs(encoded, dpo.heldout, seed, "dpo")
        pad = pad_id(tok)
        refs = {}
        live = None
        if dpo.reference == "live" and not dpo.reference_free:
            live = reference_copy(model)
        for name, part in (("train", train_pairs), ("held", held)):
            if dpo.reference_free or live is not None or not part:
                refs[name] = torch.zeros(2 * len(part))
            else:
                log(f"dpo: reference log-probs of {len(part)} {name} pairs (computed once)")
                rows = [r for e in part for r in e]
                refs[name] = reference_logps(model, rows, pad, cfg.seq_len, 8, cfg.precision)

        def batch_of(indices: list[int], is_held: bool) -> Batch:
            part, ref = (held, refs["held"]) if is_held else (train_pairs, refs["train"])
            rows = [r for i in indices for r in part[i]]
            picked = torch.cat([ref[2 * i : 2 * i + 2] for i in indices])
            return make_batch(rows, picked, pad, cfg.seq_len)

        key = run_key("dpo", dpo, data, seed)
        return train_pairs_loop(
            "dpo", model, len(train_pairs), len(held), batch_of, dpo_objective(dpo, live),
            cfg, out_dir, ckpt, key, seed, one_pass,
        )  # fmt: skip
