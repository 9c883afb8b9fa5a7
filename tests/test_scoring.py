"""The one windowed-loss scorer (lmlab.model.scoring): its windows, its sums, and the six
places that score a model over a token stream agreeing on one model and one stream."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.data.perplexity import checkpoint_scorer
from lmlab.data.shards import open_split, write_manifest
from lmlab.eval.lm import lm_metrics
from lmlab.infer.quantize import _perplexity
from lmlab.model import ModelConfig, Transformer
from lmlab.model.checkpoint import save_checkpoint
from lmlab.model.scoring import (
    IGNORE,
    score,
    stream_windows,
    token_byte_lengths,
    token_loss_sum,
)
from lmlab.run.compare import window_losses
from lmlab.run.scaling import validation_loss
from lmlab.tokenizer import EOS, save_tokenizer, special_id
from lmlab.tokenizer.train import train_bpe
from lmlab.train.loop import evaluate_loss
from lmlab.train.objectives import causal_batch

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 20)))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random model saved as a checkpoint, its tokenizer, and a validation split."""
    root = tmp_path_factory.mktemp("scoring")
    tok = train_bpe(iter(_texts(200, 0)), 300, 2)
    save_tokenizer(tok, root / "tok")
    eos = special_id(tok, EOS)
    ids = []
    for t in _texts(80, 1):
        ids += tok.encode(t).ids + [eos]
    shards = root / "tok" / "tokens"
    shards.mkdir()
    for split in ("train", "val"):
        np.asarray(ids, dtype=np.uint16).tofile(shards / f"{split}.bin")
        np.save(shards / f"{split}.idx.npy", np.asarray([0, len(ids)], dtype=np.int64))
    info = {"tokens": len(ids), "documents": 1}
    splits = {s: {"file": f"{s}.bin", "index": f"{s}.idx.npy", **info} for s in ("train", "val")}
    write_manifest(shards, tok, splits)
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layers=2, d_model=32, n_heads=2, vocab_size=tok.get_vocab_size(), max_seq_len=32
    )
    model = Transformer(cfg).eval()
    save_checkpoint(model, root / "model", tokenizer_dir=root / "tok")
    return types.SimpleNamespace(root=root, tok=tok, eos=eos, model=model, shards=shards)


def test_windows_score_every_token_once_whatever_the_overlap():
    tokens = np.arange(50)
    for length, overlap in [(9, 0), (9, 1), (9, 3), (8, 7)]:
        rows = list(stream_windows(tokens, length, overlap, ragged=True))
        assert all(len(x) == len(y) <= length - 1 for x, y in rows)
        for x, y in rows:  # a target is the token after its input
            scored = y != IGNORE
            np.testing.assert_array_equal(y[scored], x[scored] + 1)
        targets = np.concatenate([y[y != IGNORE] for _, y in rows])
        assert len(set(targets.tolist())) == len(targets)  # none twice
        lost = (len(rows) - 1) if overlap == 0 else 0  # a window's first token, without overlap
        assert len(targets) == len(tokens) - 1 - lost
    whole = list(stream_windows(tokens, 9, 1))  # whole windows only: 6 × 8 targets of 49
    assert len(whole) == 6 and all(len(x) == 8 for x, _ in whole)
    assert len(list(stream_windows(tokens, 9, 1, limit=2))) == 2
    assert list(stream_windows(tokens[:5], 9)) == []
    with pytest.raises(ValueError, match="overlap"):
        list(stream_windows(tokens, 9, 9))


def test_score_is_the_cross_entropy_per_batch_or_per_row(setup):
    rows = list(stream_windows(open_split(setup.shards, "val")[:400], 17, ragged=True))
    assert len(rows[-1][0]) < 16  # a short last window, padded in its batch
    whole = score(setup.model, rows, batch_size=4)
    by_row = score(setup.model, rows, batch_size=4, per_row=True)
    alone = score(setup.model, rows[-1:], per_row=True)
    with torch.no_grad():
        x, y = (torch.from_numpy(np.asarray(a, dtype=np.int64))[None] for a in rows[0])
        direct = F.cross_entropy(setup.model(x)[0], y[0], reduction="sum").item()
    assert by_row.row_nll[0] == pytest.approx(direct, rel=1e-6)
    assert by_row.row_nll[-1] == pytest.approx(alone.row_nll[0], rel=1e-5)  # padding is inert
    assert whole.tokens == by_row.tokens == sum(by_row.row_tokens) == sum(len(y) for _, y in rows)
    assert whole.nll == pytest.approx(by_row.nll, rel=1e-6)
    assert by_row.nll == sum(by_row.row_nll)
    assert by_row.row_means()[0] == pytest.approx(direct / 16, rel=1e-6)
    assert whole.perplexity == pytest.approx(math.exp(whole.nll / whole.tokens))
    lengths = token_byte_lengths(setup.tok, setup.tok.get_vocab_size())
    with_bytes = score(setup.model, rows, batch_size=4, byte_lengths=lengths)
    nbytes = sum(int(lengths[y].sum()) for _, y in rows)
    assert with_bytes.bytes == nbytes and with_bytes.nll == whole.nll
    assert with_bytes.bits_per_byte == pytest.approx(whole.nll / math.log(2) / nbytes)


def test_token_loss_sum_skips_ignored_targets():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, :2] = IGNORE
    keep = targets != IGNORE
    want = F.cross_entropy(logits[keep], targets[keep], reduction="sum")
    torch.testing.assert_close(token_loss_sum(logits, targets), want)


def test_the_six_scoring_paths_agree_on_one_model_and_stream(setup):
    """Training validation, evaluation, the quantization check, a comparison's windows, a
    scaling point's loss and the perplexity filter, on one model: equal where they frame
    the stream the same way, bit for bit where they also batch it the same way."""
    model, tok, seq_len = setup.model, setup.tok, 16
    val = open_split(setup.shards, "val")
    n_windows = len(val) // (seq_len + 1)

    # evaluation and the quantization check: consecutive windows overlapping by one token
    lm = lm_metrics(model, val, tok, seq_len, max_tokens=len(val))
    q = _perplexity(model, {"tokens": val, "tokenizer": tok, "seq_len": seq_len,
                            "max_tokens": len(val)}, "q")  # fmt: skip
    assert q == lm
    # the training loop's validation on the same windows in the same batches: the same sums
    rows = list(stream_windows(val, seq_len + 1, overlap=1))
    batches = [
        causal_batch(np.stack([np.append(x, y[-1]) for x, y in rows[i : i + 8]]))
        for i in range(0, len(rows), 8)
    ]
    assert evaluate_loss(model, batches, "fp32") == lm["loss"]

    # a scaling point: non-overlapping windows of seq_len + 1, batches of 16
    point = validation_loss(setup.root / "model", setup.shards, seq_len)
    windows = [val[j * 17 : (j + 1) * 17] for j in range(n_windows)]
    disjoint = [causal_batch(np.stack(windows[i : i + 16])) for i in range(0, n_windows, 16)]
    assert evaluate_loss(model, disjoint, "fp32") == point
    # a comparison's per-window losses: the same windows, one mean each
    recipe = types.SimpleNamespace(
        pretrain=types.SimpleNamespace(
            batch_size=16, eval_batches=n_windows, seq_len=seq_len, precision="fp32"
        )
    )
    run = types.SimpleNamespace(recipe=recipe, stage_dir=lambda _: setup.root / "tok")
    per_window = window_losses(setup.root / "model", run)
    assert len(per_window) == n_windows
    assert np.mean(per_window) == pytest.approx(point, rel=1e-6)

    # the perplexity filter frames a text with EOS and reads whole windows of the context
    # (32 tokens overlapping by one); a text that fills them exactly is lm_metrics' stream
    score_text = checkpoint_scorer(setup.root / "model")
    words = 40
    while (len(tok.encode(" ".join(["alpha"] * words)).ids) + 1) % 31:
        words += 1
    text = " ".join(["alpha"] * words)
    framed = np.array([setup.eos, *tok.encode(text).ids, setup.eos])
    assert len(framed) > 32  # more than one window
    ppl = lm_metrics(model, framed, tok, 31, max_tokens=len(framed))["perplexity"]
    assert score_text(text) == pytest.approx(ppl, rel=1e-5)
