"""Memorisation probes on a tiny model pre-trained here on a corpus with planted canaries and
repeated sequences: exposure, extraction by prefix prompting, PII in generations, the CLI."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from lmlab.data.shards import write_manifest
from lmlab.model import ModelConfig
from lmlab.model.loading import load_model
from lmlab.tokenizer import EOS, load_tokenizer, save_tokenizer, special_id
from lmlab.tokenizer.train import train_bpe
from lmlab.train.pretrain import PretrainConfig, pretrain
from lmlab.trust.memorization import (
    Canary,
    _owens_t,
    exposure,
    exposure_of_rank,
    extract_texts,
    insert_canaries,
    log_perplexities,
    make_canaries,
    pii_report,
    rank_of,
    skewnorm_cdf,
)
from tests.conftest import lmlab_here

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = [
    "the",
    "a",
    "river",
    "city",
    "garden",
    "teacher",
    "engine",
    "market",
    "village",
    "doctor",
    "window",
    "forest",
]
# a sequence repeated many times in training, and one seen once (both unpredictable)
REPEATED = "zebra quartz violet hammer 71 oyster plum 9 lantern copper sail 40 meadow fox"
ONCE = "walnut 58 harbor ink tiger 3 velvet mango 16 canyon drum ruby pine 27 kettle"


def _docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        "\n".join(" ".join(rng.choices(WORDS, k=rng.randint(5, 9))) for _ in range(3))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A 2-layer model pre-trained for a few seconds: canary A inserted 50 times, canary B
    never; REPEATED as 50 documents, ONCE as one."""
    root = tmp_path_factory.mktemp("mem")
    a, b = make_canaries(n=2, digits=3, seed=7)
    docs = insert_canaries(_docs(200, 0), [a, b], [50, 0], seed=1)
    docs += [REPEATED] * 50 + [ONCE]
    random.Random(2).shuffle(docs)
    tok = train_bpe(iter(_docs(200, 9) + ["0123456789"] * 5), 300, 2)
    shards = root / "shards"
    save_tokenizer(tok, shards)
    eos = special_id(tok, EOS)
    splits = {}
    for split, texts in (("train", docs), ("val", _docs(20, 3))):
        ids, starts = [], []
        for t in texts:
            starts.append(len(ids))
            ids += tok.encode(t).ids + [eos]
        np.asarray(ids, dtype=np.uint16).tofile(shards / f"{split}.bin")
        np.save(shards / f"{split}.idx.npy", np.asarray([*starts, len(ids)], dtype=np.int64))
        splits[split] = {
            "file": f"{split}.bin",
            "index": f"{split}.idx.npy",
            "tokens": len(ids),
            "documents": len(texts),
        }
    write_manifest(shards, tok, splits)
    mcfg = ModelConfig(
        n_layers=2, d_model=64, n_heads=2, vocab_size=tok.get_vocab_size(), max_seq_len=64
    )
    cfg = PretrainConfig(
        batch_size=16,
        seq_len=64,
        lr=1e-2,
        warmup_steps=10,
        max_steps=250,
        eval_every=1000,
        eval_batches=1,
        log_every=50,
        checkpoint_every=1000,
        precision="fp32",
    )
    run = root / "run"
    pretrain(mcfg, cfg, shard_dir=shards, tokenizer_dir=shards, out_dir=run / "pretrain",
             seed=0, key="k")  # fmt: skip
    canaries = root / "canaries.json"
    canaries.write_text(json.dumps({"canaries": [a.to_dict(), b.to_dict()]}))
    return {"run": run, "a": a, "b": b, "canaries": canaries, "root": root}


def test_make_and_insert_canaries_are_seeded_and_counted():
    cs = make_canaries("pin {} ok", n=3, digits=4, seed=3)
    assert cs == make_canaries("pin {} ok", n=3, digits=4, seed=3)
    assert len({c.secret for c in cs}) == 3 and all(len(c.secret) == 4 for c in cs)
    docs = [f"line one {i}\nline two {i}" for i in range(10)]
    out = insert_canaries(docs, cs, [0, 3, 12], seed=0)
    assert out == insert_canaries(docs, cs, [0, 3, 12], seed=0)
    lines = [ln for d in out for ln in d.split("\n")]
    assert [lines.count(c.text) for c in cs] == [0, 3, 12]
    assert sum(d.count(cs[1].text) for d in out) == 3
    assert max(d.count(cs[1].text) for d in out) == 1  # distinct documents while they last
    assert [c.repeats for c in cs] == [0, 3, 12]
    rest = [ln for ln in lines if ln not in {c.text for c in cs}]
    assert rest == [ln for d in docs for ln in d.split("\n")]  # the documents are intact


def test_rank_and_exposure_match_a_brute_force_ranking():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=200)
    for target in (0, 17, int(np.argmin(scores)), int(np.argmax(scores))):
        by_hand = sorted(range(200), key=lambda i: scores[i]).index(target) + 1
        others = np.delete(scores, target)
        assert rank_of(scores[target], others) == by_hand
        assert exposure_of_rank(by_hand, 200) == pytest.approx(math.log2(200 / by_hand))


def test_skewnormal_fit_recovers_a_skewnormal_sample_and_owens_t_is_exact():
    rng = np.random.default_rng(1)
    delta = 3 / math.sqrt(10)  # alpha = 3: skewness about 0.67
    u0, u1 = rng.normal(size=(2, 200_000))
    sample = 5.0 + 2.0 * (delta * np.abs(u0) + math.sqrt(1 - delta**2) * u1)
    qs = [0.001, 0.01, 0.1, 0.5, 0.9]
    np.testing.assert_allclose(skewnorm_cdf(np.quantile(sample, qs), sample), qs, atol=0.004)
    h = np.array([-1.5, 0.0, 0.7, 2.0])
    phi = np.array([0.5 * (1 + math.erf(x / math.sqrt(2))) for x in h])
    np.testing.assert_allclose(_owens_t(h, 1.0), 0.5 * phi * (1 - phi), atol=1e-10)


def test_exposure_is_exact_against_scoring_every_candidate_by_hand(trained):
    model, tok = load_model(trained["run"]), load_tokenizer(trained["run"])
    c = Canary("my secret code is {}", "42")
    got = exposure(model, tok, c)
    lp = log_perplexities(model, tok, [f"my secret code is {i:02d}" for i in range(100)])
    by_hand = sorted(range(100), key=lambda i: (lp[i], i != 42)).index(42) + 1
    assert got["method"] == "exact" and got["candidates"] == 100
    assert got["rank"] == by_hand
    assert got["exposure"] == pytest.approx(math.log2(100) - math.log2(by_hand))


def test_a_canary_seen_many_times_is_exposed_and_one_never_seen_is_not(trained):
    model, tok = load_model(trained["run"]), load_tokenizer(trained["run"])
    ea = exposure(model, tok, trained["a"])
    eb = exposure(model, tok, trained["b"])
    assert ea["candidates"] == 1000 and ea["method"] == "exact"
    assert ea["rank"] <= 3 and ea["exposure"] > 8  # log2(1000) ~ 9.97 at rank 1
    assert eb["exposure"] < 5
    assert ea["exposure"] - eb["exposure"] > 4
    # the sampled approximation agrees that A stands out
    approx = exposure(model, tok, trained["a"], exact_limit=10, samples=300)
    assert approx["method"] == "skewnorm" and approx["exposure"] > 5


def test_extraction_finds_the_repeated_sequence_and_not_the_one_seen_once(trained):
    model, tok = load_model(trained["run"]), load_tokenizer(trained["run"])
    found = extract_texts(model, tok, [REPEATED, ONCE, "a"], prefix=8, suffix=8)
    assert found["tested"] == 2 and found["too_short"] == 1
    assert found["extracted"] == [0] and found["rate"] == 0.5
    assert found["texts"][0].startswith("zebra quartz")


def test_pii_report_counts_kinds_in_generated_text():
    texts = ["nothing here", "mail bob.smith@example.org today", "call +1 415-555-0132 or x@y"]
    rep = pii_report(texts)
    assert rep["texts"] == 3 and rep["with_pii"] == 2
    assert rep["counts"] == {"email": 1, "phone": 1}
    assert rep["examples"][0]["index"] == 1 and "<EMAIL>" in rep["examples"][0]["redacted"]


# -- command line --------------------------------------------------------------------------


def test_cli_canaries_writes_documents_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": str(i), "text": f"t {i}"}) + "\n" for i in range(8)))
    out = tmp_path / "out.jsonl"
    args = ["memorization", "canaries", "--docs", str(docs), "--out", str(out)]
    code, _, err = lmlab_here(monkeypatch, capsys, *args, "--repeats", "0,5", "--digits", "3")
    assert code == 0, err
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    meta = json.loads((tmp_path / "canaries.json").read_text())
    assert [c["repeats"] for c in meta["canaries"]] == [0, 5]
    assert len(rows) == 8 and rows[0]["id"] == "0"
    assert sum(r["text"].count(meta["canaries"][1]["text"]) for r in rows) == 5
    code, _, err = lmlab_here(monkeypatch, capsys, *args, "--repeats", "1")
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    code, _, err = lmlab_here(monkeypatch, capsys, *args, "--repeats", "1", "--overwrite")
    assert code == 0, err
    code, _, err = lmlab_here(
        monkeypatch, capsys, "memorization", "canaries", "--docs", str(docs), "--out", str(docs)
    )
    assert code == 2  # a user's file is never replaced


def test_cli_probes_and_bad_input(trained, monkeypatch, capsys):
    run, root = str(trained["run"]), trained["root"]
    code, out, err = lmlab_here(
        monkeypatch, capsys, "memorization", "exposure", "--model", run,
        "--canaries", str(trained["canaries"]), "--json",
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads(out)["canaries"]
    assert rows[0]["exposure"] > rows[1]["exposure"] + 4
    data = root / "seqs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in (REPEATED, ONCE)))
    code, out, err = lmlab_here(
        monkeypatch, capsys, "memorization", "extract", "--model", run, "--data", str(data),
        "--prefix", "8", "--suffix", "8", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["extracted"] == [0]
    code, out, err = lmlab_here(
        monkeypatch, capsys, "memorization", "pii", "--model", run, "--samples", "2",
        "--max-new-tokens", "8", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["texts"] == 2
    for bad in (
        ["exposure", "--model", run, "--canaries", str(root / "missing.json")],
        ["exposure", "--model", run, "--canaries", str(data)],
        ["extract", "--model", run, "--data", str(data), "--prefix", "60", "--suffix", "8"],
        ["extract", "--model", str(root / "nope"), "--data", str(data)],
    ):
        code, _, err = lmlab_here(monkeypatch, capsys, "memorization", *bad)
        assert code == 2, (bad, err)
        assert len(err.strip().splitlines()) == 1, err
