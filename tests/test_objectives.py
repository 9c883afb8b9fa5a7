"""Pre-training objectives: T5 noise masks and span corruption, prefix LM, the mixture."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from lmlab.errors import UsageError
from lmlab.model import ModelConfig, Transformer
from lmlab.model.encdec import EncoderDecoder
from lmlab.model.scoring import token_loss_sum
from lmlab.tokenizer import load_tokenizer, save_tokenizer
from lmlab.tokenizer.train import train_bpe
from lmlab.train.batch import logits_of
from lmlab.train.objectives import (
    ObjectiveConfig,
    add_sentinels,
    causal_batch,
    choose_objective,
    decoder_span_tokens,
    make_batch,
    needs_sentinels,
    prefix_batch,
    random_spans_mask,
    span_batch,
    span_counts,
    span_lengths,
)

pytestmark = pytest.mark.usefixtures("one_thread")

EOS, START = 1, 2
BASE_VOCAB = 64
SENTINELS = list(range(BASE_VOCAB, BASE_VOCAB + 16))
VOCAB = BASE_VOCAB + len(SENTINELS)


def runs(mask: np.ndarray) -> list[tuple[bool, int]]:
    """(value, length) of each maximal run of equal values."""
    out: list[tuple[bool, int]] = []
    for v in mask.tolist():
        if out and out[-1][0] == v:
            out[-1] = (v, out[-1][1] + 1)
        else:
            out.append((v, 1))
    return out


def random_rows(rng: np.random.Generator, b: int, length: int) -> np.ndarray:
    return rng.integers(3, BASE_VOCAB, size=(b, length))


# --- noise mask --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length,density,mean",
    [(2, 0.15, 3.0), (10, 0.15, 3.0), (100, 0.15, 3.0), (257, 0.15, 3.0), (64, 0.5, 1.0),
     (50, 0.3, 8.0), (10, 0.9, 3.0), (1000, 0.05, 2.5)],
)  # fmt: skip
def test_noise_mask_counts_and_alternation(length, density, mean):
    noise = min(max(round(length * density), 1), length - 1)
    spans = min(max(1, round(noise / mean)), length - noise)
    assert span_counts(length, density, mean) == (noise, spans)
    for seed in range(20):
        mask = random_spans_mask(length, density, mean, np.random.default_rng(seed))
        assert mask.dtype == bool and mask.shape == (length,)
        assert int(mask.sum()) == noise
        r = runs(mask)
        assert len(r) == 2 * spans  # non-noise, noise, non-noise, noise, ...
        assert [v for v, _ in r] == [False, True] * spans


def test_noise_mask_is_deterministic_per_seed():
    a = random_spans_mask(500, 0.15, 3.0, np.random.default_rng([7, 3]))
    b = random_spans_mask(500, 0.15, 3.0, np.random.default_rng([7, 3]))
    c = random_spans_mask(500, 0.15, 3.0, np.random.default_rng([7, 4]))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_noise_span_lengths_are_a_uniform_partition():
    """The first noise span's length follows the marginal of a uniform composition of n
    into k parts, P(j) = C(n-j-1, k-2) / C(n-1, k-1); and the mean span length over
    many windows of assorted lengths is close to the configured one."""
    rng = np.random.default_rng(0)
    n, k = span_counts(100, 0.15, 3.0)
    assert (n, k) == (15, 5)
    firsts = []
    for _ in range(4000):
        r = runs(random_spans_mask(100, 0.15, 3.0, rng))
        firsts.append(r[1][1])
    firsts = np.array(firsts)
    for j in range(1, 6):
        expected = math.comb(n - j - 1, k - 2) / math.comb(n - 1, k - 1)
        assert abs((firsts == j).mean() - expected) < 0.03, j
    lengths, noise, total = [], 0, 0
    for length in rng.integers(40, 600, size=300):
        mask = random_spans_mask(int(length), 0.15, 3.0, rng)
        lengths += [n for v, n in runs(mask) if v]
        noise += int(mask.sum())
        total += int(length)
    assert abs(np.mean(lengths) - 3.0) < 0.15
    assert abs(noise / total - 0.15) < 0.005


def test_span_lengths_match_t5():
    """T5's published sizing: 568 raw tokens make 512 encoder and 114 target tokens; and
    compute_input_and_target_lengths' formula by hand for other lengths."""
    cfg = ObjectiveConfig(causal=0, span=1)
    assert span_lengths(568, cfg) == (512, 114)
    for length in (20, 65, 129, 257, 1025):
        noise = int(round(length * 0.15))
        spans = int(round(noise / 3.0))
        assert span_lengths(length, cfg) == (length - noise + spans + 1, noise + spans + 1)


# --- span corruption ---------------------------------------------------------------------


def uncorrupt(corrupted: list[int], targets: list[int]) -> tuple[list[int], list[int]]:
    """Rebuild the original tokens from (corrupted + EOS, targets + EOS); also return the
    sentinels in the order they appear in the corrupted text."""
    assert corrupted[-1] == EOS and targets[-1] == EOS
    spans: dict[int, list[int]] = {}
    for t in targets[:-1]:
        if t in SENTINELS:
            assert t not in spans
            current = spans[t] = []
        else:
            current.append(t)
    out, order = [], []
    for t in corrupted[:-1]:
        if t in SENTINELS:
            order.append(t)
            out += spans.pop(t)
        else:
            out.append(t)
    assert not spans  # every target span was used
    return out, order


def test_span_corruption_round_trip_encoder_decoder():
    rng = np.random.default_rng(1)
    cfg = ObjectiveConfig(causal=0, span=1, sentinels=16)
    rows = random_rows(rng, 8, 65)
    batch = span_batch(rows, rng, cfg, SENTINELS, "encoder_decoder", EOS, START)
    enc_len, dec_len = span_lengths(65, cfg)
    assert batch.inputs.shape == (8, enc_len) and batch.targets.shape == (8, dec_len)
    assert batch.inputs.dtype == batch.targets.dtype == torch.int64
    assert torch.equal(batch.decoder_inputs[:, 0], torch.full((8,), START))
    assert torch.equal(batch.decoder_inputs[:, 1:], batch.targets[:, :-1])
    assert batch.prefix_len is None and batch.n_targets == 8 * dec_len
    _, spans = span_counts(65, 0.15, 3.0)
    for b in range(8):
        original, order = uncorrupt(batch.inputs[b].tolist(), batch.targets[b].tolist())
        assert original == rows[b].tolist()
        assert order == SENTINELS[:spans]
        assert batch.targets[b, 0] == SENTINELS[0]
    # each row draws its own mask
    assert len({tuple(r) for r in batch.targets[:, :].tolist()}) > 1


@pytest.mark.parametrize("family", ["decoder", "prefix"])
def test_span_corruption_round_trip_decoder_only(family):
    rng = np.random.default_rng(2)
    cfg = ObjectiveConfig(causal=0, span=1, sentinels=16)
    window = 65
    rows = random_rows(rng, 6, window)
    batch = span_batch(rows, rng, cfg, SENTINELS, family, EOS, START)
    m = decoder_span_tokens(window, cfg)
    enc_len, dec_len = span_lengths(m, cfg)
    assert batch.inputs.shape == (6, enc_len + dec_len - 1)
    assert batch.inputs.shape[1] <= window - 1  # fits seq_len
    assert decoder_span_tokens(window, cfg) == m
    assert span_lengths(m + 1, cfg)[0] + span_lengths(m + 1, cfg)[1] - 1 > window - 1
    assert torch.equal(batch.prefix_len, torch.full((6,), enc_len))
    assert batch.decoder_inputs is None
    # no loss on the corrupted part; the last corrupted token (EOS) predicts sentinel 0
    assert (batch.targets[:, : enc_len - 1] == -100).all()
    assert (batch.targets[:, enc_len - 1 :] != -100).all()
    assert batch.n_targets == 6 * dec_len
    full = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1)
    assert torch.equal(batch.targets[:, enc_len - 1 :], full[:, enc_len:])
    for b in range(6):
        original, order = uncorrupt(full[b, :enc_len].tolist(), full[b, enc_len:].tolist())
        assert original == rows[b, :m].tolist()
        assert order == SENTINELS[: len(order)] and len(order) >= 1


# --- prefix LM ---------------------------------------------------------------------------


def test_prefix_batch_loss_only_on_the_suffix():
    rng = np.random.default_rng(3)
    cfg = ObjectiveConfig(causal=0, prefix=1, prefix_min=0.25, prefix_max=0.75)
    rows = random_rows(rng, 64, 41)
    doc_ids = np.repeat(np.arange(41)[None] // 20, 64, axis=0)
    batch = prefix_batch(rows, rng, cfg, doc_ids)
    p = batch.prefix_len.numpy()
    assert p.min() >= 10 and p.max() <= 30 and len(set(p.tolist())) > 5
    assert torch.equal(batch.inputs, torch.from_numpy(rows[:, :-1]))
    assert torch.equal(batch.doc_ids, torch.from_numpy(doc_ids[:, :-1]))
    for b in range(64):
        t = batch.targets[b].numpy()
        assert (t[: p[b] - 1] == -100).all()
        assert np.array_equal(t[p[b] - 1 :], rows[b, p[b] :])  # every suffix token, once
    assert batch.n_targets == int((41 - p).sum())


def test_prefix_split_stays_inside_the_sequence():
    rng = np.random.default_rng(4)
    rows = random_rows(rng, 200, 5)
    for lo, hi in [(0.0, 0.0), (1.0, 1.0), (0.0, 1.0)]:
        cfg = ObjectiveConfig(causal=0, prefix=1, prefix_min=lo, prefix_max=hi)
        p = prefix_batch(rows, rng, cfg).prefix_len
        assert p.min() >= 1 and p.max() <= 4  # a prefix and a suffix token at least


def tiny(family: str, **kw) -> ModelConfig:
    return ModelConfig(
        family=family, vocab_size=VOCAB, n_layers=2, d_model=32, n_heads=4, max_seq_len=128, **kw
    )


def test_prefix_model_attends_both_ways_only_inside_the_prefix():
    torch.manual_seed(0)
    model = Transformer(tiny("prefix")).eval()
    rng = np.random.default_rng(5)
    cfg = ObjectiveConfig(causal=0, prefix=1, prefix_min=0.5, prefix_max=0.5)
    rows = random_rows(rng, 2, 21)
    batch = prefix_batch(rows, rng, cfg)
    p = int(batch.prefix_len[0])
    assert p == 10

    def logits_with(pos: int) -> torch.Tensor:
        inputs = batch.inputs.clone()
        inputs[:, pos] = (inputs[:, pos] + 7) % BASE_VOCAB
        return logits_of(model, replace(batch, inputs=inputs))

    with torch.no_grad():
        base = logits_of(model, batch)
        in_prefix = logits_with(p - 1)  # the last prefix token
        in_suffix = logits_with(p + 2)
    assert not torch.allclose(base[:, 0], in_prefix[:, 0], atol=1e-5)  # seen from position 0
    assert torch.equal(base[:, : p + 2], in_suffix[:, : p + 2])  # never seen from before it
    assert not torch.allclose(base[:, p + 2 :], in_suffix[:, p + 2 :], atol=1e-5)
    # packed documents still isolate inside the prefix: a second document from position 5
    doc_ids = (np.arange(21)[None] >= 5).repeat(2, axis=0)
    docs = prefix_batch(rows, np.random.default_rng(5), cfg, doc_ids)
    assert torch.equal(docs.prefix_len, batch.prefix_len)
    with torch.no_grad():
        before = logits_of(model, docs)
        inputs = docs.inputs.clone()
        inputs[:, p - 1] = (inputs[:, p - 1] + 7) % BASE_VOCAB
        after = logits_of(model, replace(docs, inputs=inputs))
    assert torch.equal(before[:, :5], after[:, :5])
    assert not torch.allclose(before[:, 5], after[:, 5], atol=1e-5)


# --- training ----------------------------------------------------------------------------


def periodic_stream(rng: np.random.Generator, period: int = 12, n: int = 4000) -> np.ndarray:
    pattern = rng.integers(3, BASE_VOCAB, size=period)
    return np.tile(pattern, n // period + 1)[:n]


def train_losses(model, make, steps: int = 100, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        batch = make(step)
        loss = token_loss_sum(logits_of(model, batch), batch.targets) / batch.n_targets
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def windows(stream: np.ndarray, rng: np.random.Generator, b: int, length: int) -> np.ndarray:
    starts = rng.integers(0, len(stream) - length, size=b)
    return np.stack([stream[s : s + length] for s in starts])


@pytest.mark.parametrize(
    "family,weights",
    [
        ("encoder_decoder", {"causal": 0, "span": 1}),
        ("prefix", {"causal": 1, "prefix": 1, "span": 1}),
    ],
)
def test_training_on_the_objective_lowers_the_loss(family, weights):
    torch.manual_seed(0)
    stream = periodic_stream(np.random.default_rng(6))
    cfg = ObjectiveConfig(**weights, sentinels=len(SENTINELS))
    model = (EncoderDecoder if family == "encoder_decoder" else Transformer)(tiny(family))

    def make(step):
        rng = np.random.default_rng([6, step])
        return make_batch(windows(stream, rng, 16, 49), rng, cfg, family, SENTINELS, EOS, START)

    losses = train_losses(model, make)
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    print(f"{family}: loss {first:.3f} -> {last:.3f}")
    assert last < 0.6 * first, (first, last)


# --- the mixture -------------------------------------------------------------------------


def kind_of(batch) -> str:
    if batch.decoder_inputs is not None or bool(np.isin(batch.inputs, SENTINELS).any()):
        return "span"
    return "prefix" if batch.prefix_len is not None else "causal"


def test_mixture_frequencies_follow_the_weights():
    cfg = ObjectiveConfig(causal=5, prefix=3, span=2, sentinels=16)
    assert cfg.weights == pytest.approx({"causal": 0.5, "prefix": 0.3, "span": 0.2})
    rows = random_rows(np.random.default_rng(7), 2, 33)
    counts = {"causal": 0, "prefix": 0, "span": 0}
    n = 2000
    for seed in range(n):
        batch = make_batch(
            rows, np.random.default_rng([seed, 0]), cfg, "prefix", SENTINELS, EOS, START
        )
        kind = kind_of(batch)
        assert kind == choose_objective(cfg, np.random.default_rng([seed, 0]))
        counts[kind] += 1
    for name, w in cfg.weights.items():
        assert abs(counts[name] / n - w) < 0.04, counts


def test_same_seed_and_step_make_the_same_batch():
    cfg = ObjectiveConfig(causal=1, prefix=1, span=1, sentinels=16)
    stream = np.random.default_rng(8).integers(3, BASE_VOCAB, size=1000)

    def batch(seed, step):  # as the pretrain loader does: windows, then the objective
        rng = np.random.default_rng([seed, step])
        return make_batch(windows(stream, rng, 4, 33), rng, cfg, "prefix", SENTINELS, EOS, START)

    kinds = set()
    for step in range(12):
        kinds.add(kind_of(batch(11, step)))
        assert same(batch(11, step), batch(11, step))
    assert kinds == {"causal", "prefix", "span"}
    assert not any(same(batch(11, step), batch(11, step + 1)) for step in range(12))


def same(a, b) -> bool:
    """Every field of two batches equal (both None, or equal tensors of one shape)."""
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            return False
    return True


def test_causal_batch_passes_documents_through():
    rows = np.arange(2 * 9).reshape(2, 9).astype(np.uint16)  # shards may be uint16
    doc_ids = np.array([[0] * 4 + [1] * 5, [2] * 9])
    batch = causal_batch(rows, doc_ids)
    assert batch.inputs.dtype == torch.int64
    assert torch.equal(batch.inputs, torch.from_numpy(rows[:, :-1].astype(np.int64)))
    assert torch.equal(batch.targets, torch.from_numpy(rows[:, 1:].astype(np.int64)))
    assert torch.equal(batch.doc_ids, torch.from_numpy(doc_ids[:, :-1]))
    assert batch.prefix_len is None and batch.n_targets == 16


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"noise_density": 0.0}, "noise_density"),
        ({"noise_density": 1.0}, "noise_density"),
        ({"mean_span_length": 0.5}, "mean_span_length"),
        ({"causal": 0.0}, "all 0"),
        ({"prefix": -1.0}, "objective.prefix"),
        ({"prefix_min": 0.8, "prefix_max": 0.2}, "prefix_min"),
        ({"sentinels": 0}, "sentinels"),
    ],
)
def test_impossible_config_values(kw, key):
    with pytest.raises(UsageError, match=key):
        ObjectiveConfig(**kw)
    with pytest.raises(ValidationError):  # as a recipe validates it
        TypeAdapter(ObjectiveConfig).validate_python(kw)


def test_config_validates_like_a_recipe():
    cfg = TypeAdapter(ObjectiveConfig).validate_python({"span": 1, "causal": 0})
    assert needs_sentinels(cfg) and not needs_sentinels(ObjectiveConfig())
    with pytest.raises(ValidationError, match="spn"):  # a misspelt key
        TypeAdapter(ObjectiveConfig).validate_python({"spn": 1})


def test_family_errors_say_what_to_set():
    rows = random_rows(np.random.default_rng(9), 2, 33)
    rng = np.random.default_rng(0)
    with pytest.raises(UsageError, match="model.family: prefix"):
        make_batch(rows, rng, ObjectiveConfig(prefix=1), "decoder", [], EOS, START)
    for cfg in (ObjectiveConfig(), ObjectiveConfig(causal=0, prefix=1, span=1)):
        with pytest.raises(UsageError, match="only with the span objective"):
            make_batch(rows, rng, cfg, "encoder_decoder", SENTINELS, EOS, START)
    with pytest.raises(UsageError, match="model.family"):
        make_batch(rows, rng, ObjectiveConfig(), "gpt", [], EOS, START)
    # spans outnumber the sentinels: 257 tokens make 13 spans
    cfg = ObjectiveConfig(causal=0, span=1, sentinels=8)
    with pytest.raises(UsageError, match="objective.sentinels"):
        make_batch(random_rows(rng, 2, 257), rng, cfg, "encoder_decoder", SENTINELS, EOS, START)
    with pytest.raises(UsageError, match="objective.sentinels"):
        make_batch(
            random_rows(rng, 2, 257), rng, ObjectiveConfig(causal=0, span=1), "prefix",
            SENTINELS[:4], EOS, START,
        )  # fmt: skip
    # and the span objective works on a plain causal decoder (loss on the targets only)
    batch = make_batch(rows, rng, ObjectiveConfig(causal=0, span=1), "decoder", SENTINELS, 1, 2)
    assert batch.prefix_len is not None and batch.decoder_inputs is None


# --- sentinels in the tokenizer ----------------------------------------------------------


def test_add_sentinels(tmp_path):
    texts = ["def f(x):\n    return x + 1\n", "the quick brown fox jumps over the lazy dog"] * 50
    tok = train_bpe(texts, vocab_size=300)
    base = tok.get_vocab_size()
    ids = add_sentinels(tok, 5)
    assert ids == list(range(base, base + 5))
    assert tok.get_vocab_size() == base + 5
    for i, t in enumerate(ids):
        assert tok.id_to_token(t) == f"<extra_id_{i}>"
        assert tok.decode([t], skip_special_tokens=False) == f"<extra_id_{i}>"
    assert tok.encode("x<extra_id_3>y").ids.count(ids[3]) == 1
    assert add_sentinels(tok, 5) == ids and tok.get_vocab_size() == base + 5  # idempotent
    assert add_sentinels(tok, 7)[:5] == ids and tok.get_vocab_size() == base + 7
    save_tokenizer(tok, tmp_path)
    assert add_sentinels(load_tokenizer(tmp_path), 7) == list(range(base, base + 7))


def test_sentinel_names_are_t5s():
    """transformers' T5 tokenizer names its sentinels the same way (it numbers them from the
    top of the vocabulary down; ours count up from the base vocabulary: names, not ids,
    carry the meaning)."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.T5Tokenizer(extra_ids=8)
    tok = train_bpe(["a b c d e f g h"] * 20, vocab_size=300)
    ids = add_sentinels(tok, 8)
    names = [tok.id_to_token(i) for i in ids]
    ref_ids = ref.convert_tokens_to_ids(names)
    assert ref.unk_token_id not in ref_ids
    assert [ref.decode([i]) for i in ref_ids] == names
    assert ref_ids == sorted(ref_ids, reverse=True)  # <extra_id_0> is T5's highest id
