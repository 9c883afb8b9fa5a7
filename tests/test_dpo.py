"""`lmlab align dpo` on a small checkpoint: the objective starts at ln 2 (policy = cached
reference), training makes the chosen replies more likely than the rejected ones on
held-out pairs, and bad preference files exit 2 naming file, line and field."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lmlab.adapt.dpo import encode_pair, read_pairs, reference_logps, sequence_logps
from lmlab.adapt.sft import collate
from lmlab.errors import UsageError
from lmlab.model.loading import load_model
from lmlab.tokenizer import load_tokenizer, pad_id
from tests.conftest import lmlab_here
from tests.serving import tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = "The quick brown fox jumps over the lazy dog."
BAD = "Hello world, how are you today?"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("dpo"))


def write_pairs(path, n=40):
    with open(path, "w") as f:
        for i in range(n):
            prompt = (
                f"Tell me something, number {i}."
                if i % 2
                else [{"role": "user", "content": f"Say a sentence, please ({i})."}]
            )
            chosen = GOOD if i % 3 else [{"role": "assistant", "content": GOOD}]
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": BAD}) + "\n")
    return path


def test_dpo_prefers_the_chosen_replies_on_held_out_pairs(ckpt, tmp_path, monkeypatch, capsys):
    data = write_pairs(tmp_path / "prefs.jsonl")
    out = tmp_path / "dpo"
    code, _, err = lmlab_here(
        monkeypatch, capsys, "align", "dpo", str(ckpt), "--data", str(data), "--out", str(out),
        "--steps", "12", "--batch-size", "4", "--lr", "3e-3", "--beta", "0.5", "--heldout", "0.25",
        "--seq-len", "128",
    )  # fmt: skip
    assert code == 0, err
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "reward_margin" in x and "val_loss" not in x]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference
    assert steps[0]["reward_margin"] == pytest.approx(0, abs=1e-4)
    assert steps[-1]["reward_margin"] > 0 and steps[-1]["reward_accuracy"] == 1.0
    vals = [x["val_loss"] for x in lines if "val_loss" in x]
    assert vals and vals[-1] < math.log(2) - 0.05  # the held-out pairs moved too

    # the trained checkpoint, like the reference, through the plain loaders
    tok = load_tokenizer(out / "model")
    pairs = read_pairs(data)[:6]
    rows = [r for p in pairs for r in encode_pair(tok, p)]
    before = reference_logps(load_model(ckpt), rows, pad_id(tok), 128)
    after = reference_logps(load_model(out / "model"), rows, pad_id(tok), 128)
    gain = (after - before).view(-1, 2)  # chosen, rejected
    assert (gain[:, 0] > gain[:, 1]).all()


@pytest.mark.parametrize("method,beta", [("simpo", "2.0"), ("orpo", "0.5")])
def test_reference_free_methods_learn_the_preference(
    method, beta, ckpt, tmp_path, monkeypatch, capsys
):
    data = write_pairs(tmp_path / "prefs.jsonl", n=24)
    out = tmp_path / method
    code, _, err = lmlab_here(
        monkeypatch, capsys, "align", "dpo", str(ckpt), "--data", str(data), "--out", str(out),
        "--loss-type", method, "--beta", beta, "--steps", "10", "--batch-size", "4",
        "--lr", "3e-3", "--seq-len", "128",
    )  # fmt: skip
    assert code == 0, err
    assert "reference log-probs" not in err  # no reference pass
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "reward_margin" in x and "val_loss" not in x]
    assert steps[-1]["reward_margin"] > steps[0]["reward_margin"]
    assert steps[-1]["reward_accuracy"] == 1.0
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_reference_logps_are_the_models_own(ckpt):
    tok, model = load_tokenizer(ckpt), load_model(ckpt)
    pair = read_pairs(write_pairs(ckpt.parent / "one.jsonl", n=2))[1]
    rows = encode_pair(tok, pair)
    got = reference_logps(model, rows, pad_id(tok), 128, batch=1)
    for (ids, labels), value in zip(rows, got, strict=True):
        with torch.no_grad():
            logp = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
        want = sum(logp[i, t] for i, t in enumerate(labels[1:]) if t != -100)
        assert value.item() == pytest.approx(float(want), abs=1e-4)
    x, y = collate(rows, pad_id(tok), 128)
    sums, counts = sequence_logps(model(x), y)
    assert counts.tolist() == [sum(t != -100 for t in lab[1:]) for _, lab in rows]


def test_bad_preference_files_and_settings_exit_2(ckpt, tmp_path, monkeypatch, capsys):
    cases = {
        "broken.jsonl": (
            '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": ',
            "broken.jsonl:2: not valid JSON",
        ),
        "missing.jsonl": (
            '{"prompt": "a", "chosen": "b"}\n',
            "missing.jsonl:1: field 'rejected' is missing",
        ),
        "shape.jsonl": (
            '{"prompt": 3, "chosen": "b", "rejected": "c"}\n',
            "shape.jsonl:1: field 'prompt'",
        ),
        "two.jsonl": (
            '{"prompt": "a", "chosen": [{"role": "user", "content": "x"}], "rejected": "c"}\n',
            "two.jsonl:1: field 'chosen' must hold exactly one assistant message",
        ),
    }
    for name, (text, said) in cases.items():
        (tmp_path / name).write_text(text)
        code, _, err = lmlab_here(
            monkeypatch, capsys, "align", "dpo", str(ckpt), "--data", str(tmp_path / name),
            "--out", str(tmp_path / f"out-{name}"),
        )  # fmt: skip
        assert code == 2 and said in err, (name, err)
        assert not (tmp_path / f"out-{name}").exists()  # nothing half-written
    good = write_pairs(tmp_path / "ok.jsonl", n=4)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for args, said in [(["--beta", "0"], "--beta"), (["--loss-type", "nope"], "--loss-type")]:
        code, _, err = lmlab_here(
            monkeypatch, capsys, "align", "dpo", str(ckpt), "--data", str(good),
            "--out", str(tmp_path / "o"), *args,
        )  # fmt: skip
        assert code == 2 and said in err, (args, err)
        assert not (tmp_path / "o").exists()
    mine = str(tmp_path / "mine")
    code, _, err = lmlab_here(
        monkeypatch, capsys, "align", "dpo", str(ckpt), "--data", str(good), "--out", mine
    )
    assert code == 2 and "not an lmlab output" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# --- the reward model -----------------------------------------------------------------------


def test_reward_model_learns_and_scores_the_same_in_transformers(
    ckpt, tmp_path, monkeypatch, capsys
):
    from lmlab.adapt.reward import score_positions, score_texts
    from lmlab.model.hf import export_to_hf

    transformers = pytest.importorskip("transformers")
    data = write_pairs(tmp_path / "prefs.jsonl", n=32)
    out = tmp_path / "rm"
    code, _, err = lmlab_here(
        monkeypatch, capsys, "align", "rm", str(ckpt), "--data", str(data), "--out", str(out),
        "--steps", "12", "--batch-size", "4", "--lr", "3e-3", "--heldout", "0.25",
        "--center-coefficient", "0.01", "--seq-len", "128",
    )  # fmt: skip
    assert code == 0, err
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "score_margin" in x and "val_loss" not in x]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # a zero head: ties
    assert steps[-1]["pair_accuracy"] == 1.0 and steps[-1]["score_margin"] > 0
    vals = [x["val_loss"] for x in lines if "val_loss" in x]
    assert vals[-1] < math.log(2) - 0.05

    model, tok = load_model(out / "model"), load_tokenizer(out / "model")
    assert model.cfg.reward_head
    pairs = read_pairs(data)[:4]
    rows = [ids for p in pairs for ids, _ in encode_pair(tok, p)]
    scores = score_texts(model, rows, pad_id(tok), 128)
    assert (scores[0::2] > scores[1::2]).all()  # chosen above rejected

    # exported: transformers' sequence classification gives the same scores
    hf_dir = export_to_hf(out / "model", tmp_path / "rm-hf")
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    assert type(ref).__name__.endswith("ForSequenceClassification")
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id(tok))
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    assert score_positions(ids, pad_id(tok)).tolist() == [len(r) - 1 for r in rows]
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=(ids != pad_id(tok)).long()).logits[:, 0]
    assert torch.allclose(theirs, scores, atol=1e-4)


def test_reward_margins_from_the_data_enter_the_loss(ckpt, tmp_path, monkeypatch, capsys):
    """TRL's `margin` column: -log σ(r_c − r_r − m). With the zero-initialised head every
    score is 0, so the first step's loss is the mean of log(1 + e^m) over its pairs."""
    data = tmp_path / "m.jsonl"
    recs = [json.loads(x) for x in write_pairs(tmp_path / "p.jsonl", n=8).read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "margin": 1.5}) + "\n" for r in recs))
    out = tmp_path / "rm"
    code, _, err = lmlab_here(
        monkeypatch, capsys, "align", "rm", str(ckpt), "--data", str(data), "--out", str(out),
        "--steps", "1", "--batch-size", "4", "--heldout", "0", "--seq-len", "128",
    )  # fmt: skip
    assert code == 0, err
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log1p(math.exp(1.5)), abs=1e-4)
    # with a LoRA adapter: the same first loss (a new adapter changes nothing); the head
    # trains with the adapter and loads with it
    code, _, err = lmlab_here(
        monkeypatch, capsys, "align", "rm", str(ckpt), "--data", str(data), "--out",
        str(tmp_path / "rm-lora"), "--steps", "1", "--batch-size", "4", "--heldout", "0",
        "--seq-len", "128", "--peft", "lora:r=2",
    )  # fmt: skip
    assert code == 0, err
    lora = json.loads((tmp_path / "rm-lora/metrics.jsonl").read_text().splitlines()[0])
    assert lora["loss"] == pytest.approx(first["loss"], abs=1e-6)
    conf = json.loads((tmp_path / "rm-lora/model/adapter_config.json").read_text())
    assert conf["task_type"] == "SEQ_CLS"
    assert load_model(tmp_path / "rm-lora/model").score.weight.abs().sum() > 0  # trained
    # a margin that is not a number, or margins on some pairs only: exit 2, naming them
    bad, mixed = tmp_path / "bad.jsonl", tmp_path / "mixed.jsonl"
    bad.write_text(json.dumps({**recs[0], "margin": "big"}) + "\n")
    mixed.write_text(json.dumps({**recs[0], "margin": 1}) + "\n" + json.dumps(recs[1]) + "\n")
    for data, where in ((bad, f"{bad}:1"), (mixed, "")):
        code, _, err = lmlab_here(monkeypatch, capsys, "align", "rm", str(ckpt), "--data",
                                  str(data), "--out", str(tmp_path / data.stem))  # fmt: skip
        assert code == 2 and where in err and "margin" in err


# --- KTO on unpaired feedback ---------------------------------------------------------------


def test_kto_learns_from_thumbs_up_and_down(ckpt, tmp_path, monkeypatch, capsys):
    data = tmp_path / "feedback.jsonl"
    with open(data, "w") as f:
        for i in range(32):
            good = i % 2 == 0
            rec = {"prompt": f"Tell me something, number {i}.", "completion": GOOD if good else BAD,
                   "label": good}  # fmt: skip
            f.write(json.dumps(rec) + "\n")
    out = tmp_path / "kto"
    code, _, err = lmlab_here(
        monkeypatch, capsys, "align", "kto", str(ckpt), "--data", str(data), "--out", str(out),
        "--steps", "12", "--batch-size", "4", "--lr", "3e-3", "--beta", "0.5", "--seq-len", "128",
    )  # fmt: skip
    assert code == 0, err
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "reward_desirable" in x and "val_loss" not in x]
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-4)  # 1 - sigmoid(0) at the start
    first, last = steps[0], steps[-1]
    assert last["reward_desirable"] - last["reward_undesirable"] > (
        first["reward_desirable"] - first["reward_undesirable"]
    )
    assert last["loss"] < first["loss"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b", "label": "yes"}\n')
    code, _, err = lmlab_here(
        monkeypatch,
        capsys,
        "align",
        "kto",
        str(ckpt),
        "--data",
        str(bad),
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 2 and "bad.jsonl:1: field 'label' must be true or false" in err


def test_pairs_feedback_and_instructions_from_parquet_and_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmlab.adapt.instruct import read_examples
    from lmlab.adapt.kto import read_feedback

    rows = [{"prompt": f"Question {i}?", "chosen": GOOD, "rejected": BAD} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "p.csv").write_text(
        "prompt,chosen,rejected\n" + "".join(f'"{r["prompt"]}","{GOOD}","{BAD}"\n' for r in rows)
    )
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    want = read_pairs(jsonl)
    assert read_pairs(tmp_path / "p.parquet") == want == read_pairs(tmp_path / "p.csv")
    fb = [
        {"prompt": "Q?", "completion": GOOD, "label": True},
        {"prompt": "R?", "completion": BAD, "label": False},
    ]
    pq.write_table(pa.Table.from_pylist(fb), tmp_path / "f.parquet")
    assert [f.desirable for f in read_feedback(tmp_path / "f.parquet")] == [True, False]
    alpaca = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}]
    pq.write_table(pa.Table.from_pylist(alpaca), tmp_path / "a.parquet")
    assert read_examples(tmp_path / "a.parquet")[0][-1] == {"role": "assistant", "content": "5"}
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "Q?", "chosen": "x"}]), tmp_path / "bad.parquet"
    )
    with pytest.raises(UsageError, match=r"bad.parquet#0: field 'rejected' is missing"):
        read_pairs(tmp_path / "bad.parquet")


def test_live_reference_gives_the_cached_losses(ckpt, tmp_path, monkeypatch, capsys):
    data = write_pairs(tmp_path / "prefs.jsonl", n=16)
    losses = {}
    for mode in ("cached", "live"):
        out = tmp_path / mode
        code, _, err = lmlab_here(
            monkeypatch, capsys, "align", "dpo", str(ckpt), "--data", str(data), "--out", str(out),
            "--steps", "4", "--batch-size", "4", "--lr", "3e-3", "--seq-len", "128",
            "--reference", mode,
        )  # fmt: skip
        assert code == 0, err
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [x["loss"] for x in lines if "reward_margin" in x and "val_loss" not in x]
    assert losses["live"] == pytest.approx(losses["cached"], abs=2e-4)


_DDP_SCRIPT = """
import sys
from lmlab.adapt.dpo import DPOConfig, align_dpo
from lmlab.model.adapters import parse_peft
from lmlab.train.loop import TrainConfig

ckpt, data, out, peft = sys.argv[1:5]
# fp32: under bf16 autocast (precision auto on a bf16 CPU) two ranks' sums round differently
cfg = TrainConfig(batch_size=4, seq_len=128, lr=1e-3, warmup_steps=0, max_steps=3,
                  log_every=1, eval_every=100, checkpoint_every=100, precision="fp32")
align_dpo(ckpt, [data], out, DPOConfig(heldout=0.0), cfg, seed=0,
          peft=parse_peft(peft) if peft != "none" else None)
"""


def test_dpo_on_two_processes_matches_one(ckpt, tmp_path):
    """Rows interleave each pair's chosen and rejected replies, so a rank's slice of rows
    keeps pairs whole: under torchrun (DDP, 2 ranks) the per-step losses and the final
    weights are those of one process. With a LoRA adapter, so the frozen base weights
    outside DDP's buckets are covered too (full-weight DDP: tests/test_train.py)."""
    peft = "lora:r=4"
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = tmp_path / "job.py"
    script.write_text(_DDP_SCRIPT)
    data = write_pairs(tmp_path / "prefs.jsonl", n=12)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]  # fmt: skip
    losses, weights = {}, {}
    for name, launcher in (("one", [sys.executable]), ("two", torchrun)):
        out = tmp_path / name
        p = subprocess.run([*launcher, str(script), str(ckpt), str(data), str(out), peft],
                           env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [x["loss"] for x in lines if "loss" in x and "val_loss" not in x]
        files = list((out / "model").glob("*.safetensors"))
        weights[name] = load_file(files[0])
    assert len(losses["one"]) == 3
    np.testing.assert_allclose(losses["two"], losses["one"], rtol=1e-4)
    for k, v in weights["one"].items():
        torch.testing.assert_close(weights["two"][k], v, rtol=1e-3, atol=1e-5)
