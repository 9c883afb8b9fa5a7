"""`lmlab sft --model M --data FILE...`: the three record formats, loss on assistant turns
only, packing that keeps examples apart (equal to running each alone), weighted mixing,
and the command with its bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.adapt.instruct import (
    encode_conversation,
    mixture_index,
    pack,
    parse_source,
    read_examples,
)
from lmlab.model.loading import load_model
from lmlab.model.scoring import IGNORE
from lmlab.tokenizer import load_tokenizer, pad_id
from lmlab.train.batch import Batch, logits_of
from tests.conftest import lmlab_here
from tests.serving import tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello world"},
    {"role": "assistant", "content": "Hi there."},
    {"role": "user", "content": "How are you today?"},
    {"role": "assistant", "content": "I am fine, thank you."},
]}  # fmt: skip
PAIR = {"prompt": "The quick brown fox", "completion": "jumps over the lazy dog."}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("sft"))


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_formats_and_the_learned_tokens(ckpt, tmp_path):
    tok = load_tokenizer(ckpt)
    turns = read_examples(write(tmp_path / "a.jsonl", [CHAT, PAIR, ALPACA]))
    assert turns[2][0]["content"] == "Add the numbers.\n\n2 and 3"
    ids, labels = encode_conversation(tok, turns[0])
    learned = [t for t in labels if t != IGNORE]
    # exactly the two assistant replies, each with its end of turn
    end = tok.token_to_id("<|end|>")
    text = tok.decode(learned, skip_special_tokens=True)
    assert text == "Hi there.I am fine, thank you." and learned.count(end) == 2
    assert len(ids) == len(labels)
    assert tok.decode(ids, skip_special_tokens=True).count("How are you today?") == 1


def test_packing_keeps_examples_apart(ckpt):
    tok, model = load_tokenizer(ckpt), load_model(ckpt).eval()
    examples = [encode_conversation(tok, t) for t in
                [[{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w * 3}]
                 for w in ("apple ", "river ", "stone ")]]  # fmt: skip
    x, y, docs = pack(examples, seq_len=64, pad=pad_id(tok))
    assert x.shape[0] == 1 and set(docs[0].tolist()) == {0, 1, 2, 3}  # 3 examples + padding
    with torch.no_grad():
        packed = logits_of(model, Batch(x, y, doc_ids=docs))[0]
        at = 0
        for ids, labels in examples:
            n = len(ids) - 1
            alone = model(torch.tensor([ids[:-1]]))[0]
            assert torch.allclose(packed[at : at + n], alone, atol=1e-4)
            assert y[0, at : at + n].tolist() == labels[1:]  # no target from the next example
            at += n


def test_weighted_mixing_is_seeded_and_proportional():
    draws = [mixture_index([10, 50], [3.0, 1.0], seed=4, row=r) for r in range(4000)]
    share = sum(k == 0 for k, _ in draws) / len(draws)
    assert share == pytest.approx(0.75, abs=0.03)
    assert draws == [mixture_index([10, 50], [3.0, 1.0], seed=4, row=r) for r in range(4000)]
    assert all(0 <= i < (10, 50)[k] for k, i in draws)
    assert parse_source("a.jsonl:2.5").weight == 2.5 and parse_source("a.jsonl").weight == 1.0


def test_the_command(ckpt, tmp_path, monkeypatch, capsys):
    a = write(tmp_path / "a.jsonl", [CHAT, PAIR, ALPACA] * 10)
    b = write(tmp_path / "b.jsonl", [PAIR] * 20)
    out = tmp_path / "tuned"
    code, stdout, err = lmlab_here(
        monkeypatch, capsys, "sft", "--model", str(ckpt), "--data", f"{a}:2", "--data", str(b),
        "--out", str(out), "--steps", "8", "--batch-size", "4", "--lr", "3e-3", "--seq-len", "128",
    )  # fmt: skip
    assert code == 0, err
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x and "val_loss" not in x]
    assert losses[-1] < losses[0]
    assert load_model(out / "model").cfg.vocab_size == load_model(ckpt).cfg.vocab_size
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    for args, said in [
        (["--model", str(ckpt), "--data", str(bad), "--out", str(tmp_path / "o")], "bad.jsonl:1"),
        (["--model", str(ckpt), "--data", str(a)], "--model, --data and --out"),
        (["smoke", "--model", str(ckpt), "--data", str(a), "--out", str(tmp_path / "o")], "recipe"),
        (["--model", str(ckpt), "--data", f"{a}:-1", "--out", str(tmp_path / "o")], "weight"),
    ]:
        code, _, err = lmlab_here(monkeypatch, capsys, "sft", *args)
        assert code == 2 and said in err, (args, err)
        assert not (tmp_path / "o").exists()
