"""One DPO step of lmlab against one step of TRL's `DPOTrainer`, from the same weights on
the same batch.

lmlab's side is the real thing: `align_dpo` (pairs read from a JSONL file, rendered in the
tiny checkpoint's chat template, reference log-probs cached, one step of the training
loop). TRL's side is `DPOTrainer.train()` on the checkpoint exported to Hugging Face.

Conventions made equal, so the two steps are comparable:
- tokens: TRL would render the pairs with the tokenizer's chat template itself; here its
  dataset preparation is bypassed (`_prepare_dataset` returns the dataset as is) and it
  gets lmlab's own ids as `prompt_ids`/`chosen_ids`/`rejected_ids` (the chosen and the
  rejected exchange share the prompt; each completion runs through `<|end|>`). Everything
  after that (collation, padding, masks, reference log-probs, loss, backward, optimizer) is
  TRL's.
- reference: the start model's log-probs, precomputed once on both sides (TRL's
  `precompute_ref_log_probs=True`, lmlab's default cached reference).
- loss: sigmoid DPO, beta 0.1, completion log-probs summed over tokens, mean over pairs
  (lmlab's loop divides its summed loss by the objective's count, the pairs).
- batch: all 4 pairs in one step (their order inside the batch may differ: the mean does
  not depend on it); no truncation (no `max_length`, `seq_len` longer than every row);
  right padding on both sides (lmlab passes no attention mask, which right padding does
  not need in a causal model; TRL passes one).
- optimizer: torch AdamW (not fused), betas (0.9, 0.999), eps 1e-8, no weight decay, no
  gradient clipping, no warm-up, constant learning rate; fp32 on the CPU, no dropout.

Checked: the reference log-probs (to 1e-4 on sums of about -270), the step's loss (ln 2 on
both: the policy is the reference) and its gradient's norm (AdamW's first step hides the
gradient's scale), the DPO loss of each updated model on the batch (about 0.42, to 1e-5),
every updated weight (lmlab's model exported to HF names; see below for the tolerance) and
the logits of the two updated models on the batch (to 1e-4)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from lmlab.adapt.dpo import (
    DPOConfig,
    align_dpo,
    dpo_objective,
    encode_pair,
    make_batch,
    read_pairs,
    reference_logps,
)
from lmlab.model.hf import export_to_hf
from lmlab.model.loading import load_model
from lmlab.tokenizer import load_tokenizer, pad_id
from lmlab.train.loop import TrainConfig
from tests.serving import tiny_checkpoint

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 1e-4
BETA = 0.1
SEQ_LEN = 128
PAIRS = [
    {
        "prompt": "Say a sentence, please.",
        "chosen": "The quick brown fox jumps over the lazy dog.",
        "rejected": "Hello world, how are you today?",
    },
    {
        "prompt": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
        ],
        "chosen": "Rome is the capital of Italy.",
        "rejected": "Paris is the capital of Italy; Rome is the capital of France.",
    },
    {
        "prompt": "Write a function that adds two numbers.",
        "chosen": "def add(a, b):\n    return a + b",
        "rejected": "print(add(2, 3))",
    },
    {
        "prompt": "Tell me something.",
        "chosen": "Tokens stream to the client one by one.",
        "rejected": "I am fine, thank you very much.",
    },
]


def lmlab_step(ckpt, data, out):
    cfg = TrainConfig(
        batch_size=len(PAIRS), seq_len=SEQ_LEN, max_steps=1, lr=LR, warmup_steps=0,
        weight_decay=0.0, beta1=0.9, beta2=0.999, grad_clip=0.0, fused=False, precision="fp32",
        device="cpu", spike_zscore=0.0, log_every=1, eval_every=1000, checkpoint_every=1000,
    )  # fmt: skip
    align_dpo(ckpt, [data], out, DPOConfig(beta=BETA, loss_type="sigmoid", heldout=0.0), cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (step,) = [x for x in lines if x.get("step") == 1 and "loss" in x]
    return step, load_model(out / "model").eval()


def trl_step(hf_dir, dataset, pad_token, out):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    class PreTokenized(DPOTrainer):
        """TRL's trainer given token ids: no chat-template rendering of its own."""

        step_losses: list[float] = []

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.step_losses.append(float(loss))
            return loss

    args = TRLConfig(
        output_dir=str(out), per_device_train_batch_size=len(PAIRS), max_steps=1,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=0.0,
        optim="adamw_torch", beta=BETA, loss_type=["sigmoid"], max_length=None,
        pad_to_multiple_of=None, precompute_ref_log_probs=True,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        seed=0,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    tokenizer.pad_token = pad_token  # lmlab's (any id would do: pads are masked)
    trainer = PreTokenized(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    (loss,) = trainer.step_losses
    (logged,) = [x for x in trainer.state.log_history if "grad_norm" in x]
    return loss, logged["grad_norm"], trainer


def test_one_dpo_step_equals_trl(tmp_path):
    from datasets import Dataset
    from safetensors.torch import load_file

    ckpt = tiny_checkpoint(tmp_path / "tiny")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    tok = load_tokenizer(ckpt)
    pad = pad_id(tok)

    # the same token ids for both: lmlab's rendering of each pair
    encoded = [encode_pair(tok, p) for p in read_pairs(data)]
    rows = [r for e in encoded for r in e]  # chosen, rejected, chosen, ...
    assert max(len(ids) for ids, _ in rows) <= SEQ_LEN  # nothing is cut
    columns = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for (c_ids, c_labels), (r_ids, r_labels) in encoded:
        n = sum(label < 0 for label in c_labels)  # the prompt's masked labels
        assert c_ids[:n] == r_ids[:n] and sum(label < 0 for label in r_labels) == n
        columns["prompt_ids"].append(c_ids[:n])
        columns["chosen_ids"].append(c_ids[n:])
        columns["rejected_ids"].append(r_ids[n:])
    assert len(set(map(len, columns["chosen_ids"] + columns["rejected_ids"]))) > 2  # padding

    hf_start = export_to_hf(ckpt, tmp_path / "hf_start")
    lm_step, lm_model = lmlab_step(ckpt, data, tmp_path / "lmlab_dpo")
    trl_loss, trl_grad_norm, trainer = trl_step(
        hf_start, Dataset.from_dict(columns), tok.id_to_token(pad), tmp_path / "trl_dpo"
    )
    trl_model = trainer.model.eval()

    # the reference log-probs of the start model
    ref = reference_logps(load_model(ckpt), rows, pad, SEQ_LEN)
    for col, want in (("ref_chosen_logps", ref[0::2]), ("ref_rejected_logps", ref[1::2])):
        got = torch.tensor(trainer.train_dataset[col], dtype=torch.float32)
        assert torch.allclose(want, got, rtol=0, atol=1e-4), (col, want, got)

    # the step's loss (the policy is the reference, so ln 2) and its gradient's norm
    # (before the unused clipping), as each side logs them (lmlab: 5 decimals)
    assert lm_step["loss"] == pytest.approx(trl_loss, abs=1e-5)
    assert trl_loss == pytest.approx(math.log(2), abs=1e-5)
    assert lm_step["grad_norm"] == pytest.approx(trl_grad_norm, rel=1e-5)

    # the DPO loss of each updated model on the batch, by each side's own objective
    batch = make_batch(rows, ref, pad, SEQ_LEN)
    with torch.no_grad():
        out = dpo_objective(DPOConfig(beta=BETA))(lm_model, batch)
        lm_after = float(out.loss_sum / out.count)
        inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
        trl_after = float(trainer.compute_loss(trl_model, inputs))
    assert lm_after < math.log(2) - 0.1  # the step moved the policy (to about 0.42)
    assert lm_after == pytest.approx(trl_after, abs=1e-5)

    # every weight after the step, under HF's names. AdamW's first step moves a weight by
    # lr * g / (|g| + eps), eps = 1e-8: about the learning rate wherever the gradient is not
    # tiny, so one step hides the gradient's scale (the grad norm above checks that) and,
    # where |g| is near eps, magnifies float32 noise in g (measured: 2 of the 94,528
    # weights differ by more than 1e-7, the largest by 4.9e-7, 0.5% of the step)
    lm_hf_dir = export_to_hf(tmp_path / "lmlab_dpo" / "model", tmp_path / "hf_lm")
    lm_hf = load_file(str(lm_hf_dir / "model.safetensors"))
    start = load_file(str(hf_start / "model.safetensors"))
    trl_state = trl_model.state_dict()
    assert set(lm_hf) <= set(trl_state)
    diff = torch.cat([(w - trl_state[k]).abs().flatten() for k, w in lm_hf.items()])
    moved = torch.cat([(trl_state[k] - start[k]).abs().flatten() for k in lm_hf])
    assert moved.max() > 0.99 * LR  # the step moved the weights
    assert diff.max() < 0.02 * LR, f"largest weight difference {diff.max():g}"
    assert (diff > 1e-7).float().mean() < 1e-3  # all but a handful agree to 0.1% of the step

    # and the logits of the two updated models on the batch
    with torch.no_grad():
        lm_logits = lm_model(batch.inputs)
        trl_logits = trl_model(input_ids=batch.inputs).logits
    assert torch.allclose(lm_logits, trl_logits, rtol=0, atol=1e-4)
