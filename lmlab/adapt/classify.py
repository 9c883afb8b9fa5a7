"""Fine-tuning a sentence encoder with a classification head on labelled texts: the small
fine-tuned model that the practical guide weighs against a prompted LLM (Yang et al.
Remark 2). Training goes through lmlab's shared loop (`lmlab.train.loop.train`) with a
cross-entropy objective over the labels; `tune` chooses what trains: `full` (every
weight), `head` (the linear head alone: a linear probe on frozen features) or a PEFT
method on the encoder's linear layers (`lora:r=8,target_modules=qkv|out`, docs/peft.md).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.errors import UsageError
from lmlab.model.adapters import add_adapters, parse_peft
from lmlab.model.sentence import EncoderClassifier, default_encoder_dir, load_sentence_encoder
from lmlab.train.batch import Batch, LossOut
from lmlab.train.loop import TrainConfig, train

TUNES = ("full", "head")
IGNORE_TARGETS = -100  # Batch.targets is unused by this objective; a placeholder per row


def classification_loss(model: torch.nn.Module, batch: Batch) -> LossOut:
    """Cross-entropy of the head's logits against each row's label, summed over rows;
    accuracy logged beside it."""
    assert batch.extras is not None
    logits = model(batch.inputs, batch.extras["real"]).float()
    labels = batch.extras["labels"]
    loss = F.cross_entropy(logits, labels, reduction="sum")
    correct = (logits.argmax(-1) == labels).sum().float()
    return LossOut(loss, float(len(labels)), {"acc": correct})


def _batch(model: EncoderClassifier, texts: list[str], labels: list[int]) -> Batch:
    ids, real = model.rows(texts)
    y = torch.tensor(labels, dtype=torch.long)
    targets = torch.full((len(texts), 1), IGNORE_TARGETS)
    return Batch(ids, targets, extras={"real": real, "labels": y})


def fine_tune_classifier(
    texts: list[str],
    labels: list[int],
    label_names: list[str],
    tune: str = "full",
    epochs: int = 3,
    batch_size: int = 16,
    lr: float | None = None,
    seed: int = 0,
    min_steps: int = 30,
    encoder: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> EncoderClassifier:
    """A classifier trained on (texts, labels) for `epochs` passes (at least `min_steps`
    steps, so that a few dozen labels still get a usable number of updates). `lr`
    defaults to 5e-5 for full fine-tuning, 1e-3 for the head and 1e-3 for PEFT. The
    loop's files go to `out_dir` (a temporary directory when None)."""
    if len(texts) != len(labels) or not texts:
        raise UsageError("classifier: texts and labels must be non-empty and the same length")
    if len(set(labels)) < 2:
        raise UsageError("classifier: the training labels hold one class only")
    torch.manual_seed(seed)
    source = str(encoder) if encoder else str(default_encoder_dir())
    model = EncoderClassifier(load_sentence_encoder(source), label_names, source)
    if tune == "head":
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        default_lr = 1e-3
    elif tune == "full":
        default_lr = 5e-5
    else:
        peft = parse_peft(tune)
        if peft is None:
            raise UsageError(f"classifier: tune {tune!r} (full, head or a PEFT spec)")
        add_adapters(model, peft, base=source, seed=seed)  # the head `score` stays trainable
        default_lr = 1e-3
    n = len(texts)
    steps = max(min_steps, epochs * -(-n // batch_size))

    def order(epoch: int) -> np.ndarray:  # each pass its own seeded shuffle
        return np.random.default_rng((seed, epoch)).permutation(n)

    def get_batch(_index: int, start: int, rows: int) -> Batch:
        picked = [order(r // n)[r % n] for r in range(start, start + rows)]
        return _batch(model, [texts[i] for i in picked], [labels[i] for i in picked])

    cfg = TrainConfig(
        batch_size=batch_size,
        seq_len=model.encoder.max_len,
        lr=lr or default_lr,
        warmup_steps=max(1, steps // 10),
        weight_decay=0.01,
        max_steps=steps,
        eval_every=steps + 1,
        log_every=max(1, steps // 5),
        checkpoint_every=steps + 1,
        keep_best=False,
        spike_rollback=False,
        precision="fp32",
        device="cpu",
    )
    with tempfile.TemporaryDirectory(prefix="lmlab-classifier-") as tmp:
        out = Path(out_dir) if out_dir is not None else Path(tmp)
        key = f"classifier|{source}|{tune}|{n}|{seed}|{steps}"
        train(model, get_batch, [], cfg, out, None, key, name="classifier",
              objective=classification_loss)  # fmt: skip
    return model.eval()
