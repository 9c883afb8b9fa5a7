"""Unit behaviour of the pieces the pipeline is made of."""

import json
import math

import jinja2
import pytest
import torch
from rouge_score import rouge_scorer

from lmlab.adapt.docstring_qa import first_sentence, is_held_out, qa_pairs
from lmlab.adapt.sft import collate, encode_example
from lmlab.eval.metrics import exact_match, mean_stderr, paired_difference, rouge_l
from lmlab.model import ModelConfig, Transformer
from lmlab.tokenizer import CHAT_TEMPLATE, END, format_chat, special_id
from lmlab.tokenizer.train import train_bpe
from lmlab.train.loop import TrainConfig, train
from lmlab.train.schedule import lr_at

TEXTS = [
    'def add(a, b):\n    """Return the sum."""\n    return a + b\n',
    "Ünïcödé text — with dashes, emoji 🙂 and 中文.\n",
] * 30


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS, vocab_size=400, min_frequency=1)


def test_bpe_roundtrip_is_exact_and_specials_are_single_tokens(tok):
    for t in TEXTS[:2] + ["never seen: ß∂ƒ©˙∆ \t\n  x"]:
        assert tok.decode(tok.encode(t).ids) == t
    enc = tok.encode(format_chat([{"role": "user", "content": "hi"}])).ids
    assert enc[0] == special_id(tok, "<|user|>") and enc[-1] == special_id(tok, "<|assistant|>")


def test_format_chat_matches_the_jinja_template():
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    for gen in (True, False):
        ref = jinja2.Template(CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=gen)
        assert format_chat(msgs, add_generation_prompt=gen) == ref


def test_first_sentence():
    assert (
        first_sentence("Return the sum of a and b.\n\nMore.", 200) == "Return the sum of a and b."
    )
    assert (
        first_sentence("Create an archive (e.g. zip). Then.", 200)
        == "Create an archive (e.g. zip)."
    )
    assert first_sentence("f(a, b) -> int\n\nC signature.", 200) is None
    assert first_sentence("Short.", 200) is None
    assert first_sentence("Spans two\n    lines of text. Next.", 200) == "Spans two lines of text."


def test_qa_pairs_cover_public_functions_classes_and_methods():
    src = '''
def public():
    """Do the public thing well."""
def _private():
    """Hidden function here."""
class Thing:
    """A thing that holds things."""
    def method(self):
        """Compute the method result."""
    def _hidden(self):
        """Not asked about at all."""
'''
    names = {p["name"]: p["answer"] for p in qa_pairs("pkg.mod", src, 200)}
    assert names == {
        "pkg.mod.public": "Do the public thing well.",
        "pkg.mod.Thing": "A thing that holds things.",
        "pkg.mod.Thing.method": "Compute the method result.",
    }
    assert list(qa_pairs("bad", "def (:", 200)) == []


def test_held_out_modules_are_a_stable_fraction():
    mods = [f"m{i}" for i in range(1000)]
    held = [m for m in mods if is_held_out(m, 0.1)]
    assert 60 < len(held) < 140 and held == [m for m in mods if is_held_out(m, 0.1)]


def test_sft_example_masks_the_prompt_and_learns_the_answer(tok):
    ids, labels = encode_example(tok, "What does `x` do?", "It adds.")
    n_prompt = labels.count(-100)
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == special_id(tok, END)
    x, y = collate([(ids, labels), (ids[:5], labels[:5])], pad_id=1, max_len=64)
    assert x.shape == y.shape == (2, len(ids) - 1)
    assert y[0].tolist() == labels[1:] and (y[1, 4:] == -100).all() and (x[1, 4:] == 1).all()


def test_metrics_against_references():
    assert exact_match("The answer.", "the  answer") == 1.0
    assert exact_match("an answer", "the answer") == 0.0
    ref = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for p, r in [("the cat sat on the mat", "a cat sat on a mat"), ("x", "y"), ("run", "running")]:
        assert rouge_l(p, r) == pytest.approx(ref.score(r, p)["rougeL"].fmeasure)
    # LCS of "cat sat mat" is 3 tokens: P = 3/6, R = 3/6 → F = 0.5
    assert rouge_l("the cat sat on the mat", "a cat sat on a mat") == pytest.approx(4 / 6)
    m, se = mean_stderr([0.0, 1.0, 1.0, 0.0])
    assert m == 0.5 and se == pytest.approx(math.sqrt((4 * 0.25) / 3 / 4))
    d, dse = paired_difference([0, 0, 1], [1, 1, 1])
    assert d == pytest.approx(2 / 3) and dse > 0


def test_lr_schedule_warmup_then_cosine_to_floor():
    lrs = [lr_at(s, s / 100, 1.0, 10, 0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[100] == pytest.approx(0.1)


def _tiny_setup(tmp_path, tok):
    """A 1-layer model config, one 17-token sequence, and the tokenizer saved to disk."""
    torch.manual_seed(0)
    cfg_m = ModelConfig(
        vocab_size=tok.get_vocab_size(), n_layers=1, d_model=32, n_heads=2, max_seq_len=32
    )
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok/tokenizer.json"))
    return cfg_m, torch.tensor([tok.encode(TEXTS[0]).ids[:17]])


def test_train_loop_fits_a_repeated_sequence(tmp_path, tok):
    cfg_m, seq = _tiny_setup(tmp_path, tok)
    model = Transformer(cfg_m)

    def batch(_index, _start=0, _rows=1):
        return seq[:, :-1], seq[:, 1:]

    cfg = TrainConfig(
        batch_size=1,
        seq_len=16,
        lr=1e-2,
        warmup_steps=2,
        max_steps=60,
        eval_every=30,
        log_every=10,
        checkpoint_every=30,
        precision="fp32",
    )
    summary = train(model, batch, [batch(0)], cfg, tmp_path / "out", tmp_path / "tok", "k")
    assert summary["final_val_loss"] < 0.5
    rows = [json.loads(x) for x in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["loss"] > 4
    assert (tmp_path / "out/model/model.safetensors").is_file()


def test_model_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    c = ModelConfig(vocab_size=1000)
    assert c.padded_vocab_size == 1024
    assert sum(p.numel() for p in Transformer(c).parameters()) == c.num_params()


def test_resume_survives_a_kill_between_checkpoint_renames(tmp_path, tok):
    """save_checkpoint moves the old `last/` aside before renaming the new one in; a kill
    between the two leaves only `.last.old`, which the next run must resume from."""
    cfg_m, seq = _tiny_setup(tmp_path, tok)
    cfg = TrainConfig(
        batch_size=1,
        seq_len=16,
        warmup_steps=1,
        max_steps=10,
        eval_every=100,
        log_every=1,
        checkpoint_every=5,
        precision="fp32",
    )
    out = tmp_path / "out"
    train(
        Transformer(cfg_m),
        lambda *_: (seq[:, :-1], seq[:, 1:]),
        [],
        cfg,
        out,
        tmp_path / "tok",
        "k",
    )
    (out / "last").rename(out / ".last.old")
    (out / "model").rename(out / "first_model")
    cfg.max_steps = 12
    asked = []

    def batch(i, start, rows):
        asked.append(i)
        return seq[:, :-1], seq[:, 1:]

    summary = train(Transformer(cfg_m), batch, [], cfg, out, tmp_path / "tok", "k")
    assert asked == [10, 11]  # resumed from the step-10 checkpoint, not from scratch
    assert summary["steps"] == 12 and not (out / ".last.old").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
