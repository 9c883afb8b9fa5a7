"""De-duplication: exact hashes, span removal, MinHash-LSH, union-find, reference index."""

from __future__ import annotations

import re
import string
import unicodedata

import numpy as np
import pytest

from lmlab.data.dedup import (
    MinHashConfig,
    SpanDedupConfig,
    band_keys,
    build_index,
    estimate_jaccard,
    exact_duplicates,
    exact_hash,
    in_index,
    index_reason,
    is_index,
    load_index,
    minhash_signature,
    near_duplicate_clusters,
    remove_spans,
    repeated_spans,
    shingle_hashes,
    span_hashes,
    word_hashes,
)
from lmlab.errors import UsageError

LETTERS = np.array(list(string.ascii_lowercase))


def _vocab(rng: np.random.Generator, n: int) -> list[str]:
    words = {"".join(rng.choice(LETTERS, size=rng.integers(3, 10))) for _ in range(n * 2)}
    return sorted(words)[:n]


def _doc(rng: np.random.Generator, vocab: list[str], n_words: int) -> list[str]:
    return [vocab[i] for i in rng.integers(0, len(vocab), size=n_words)]


def _edit(rng: np.random.Generator, words: list[str], vocab: list[str], frac: float) -> list[str]:
    out = list(words)
    for i in rng.choice(len(out), size=max(1, int(frac * len(out))), replace=False):
        out[i] = vocab[rng.integers(len(vocab))]
    return out


# --- exact ---------------------------------------------------------------------------


def test_exact_hash_normalizes_case_whitespace_and_unicode_form():
    base = exact_hash("Café  au lait\nis   good.")
    assert exact_hash("café au lait is good.") == base
    assert exact_hash(unicodedata.normalize("NFD", "CAFÉ au\r\nlait is good.")) == base
    assert exact_hash("  café au lait is good.\n\n") == base
    assert exact_hash("café au lait is bad.") != base
    assert exact_hash("cafe au lait is good.") != base  # accents are content for exact dedup


def test_exact_duplicates_keeps_smallest_index_like_a_reference():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 50, size=400).astype(np.uint64)
    gidx = rng.permutation(10_000)[:400]  # arbitrary global indices, any order
    drop, first = exact_duplicates(hashes, gidx)
    ref_first: dict[int, int] = {}
    for h, g in sorted(zip(hashes.tolist(), gidx.tolist(), strict=True), key=lambda x: x[1]):
        ref_first.setdefault(h, g)
    ref_drop = sorted(
        g for h, g in zip(hashes.tolist(), gidx.tolist(), strict=True) if ref_first[h] != g
    )
    assert drop.tolist() == ref_drop
    by_g = dict(zip(gidx.tolist(), hashes.tolist(), strict=True))
    assert all(ref_first[by_g[d]] == f for d, f in zip(drop.tolist(), first.tolist(), strict=True))
    assert len(drop) == 400 - len(set(hashes.tolist()))


# --- spans ---------------------------------------------------------------------------


def test_line_spans_are_removed_from_later_documents_only():
    cfg = SpanDedupConfig(unit="line", min_chars=10)
    shared = "Subscribe to our newsletter for weekly updates\n"
    docs = [
        "First article about rivers and lakes.\n" + shared + "ok\n",
        "Second article about mountains and snow.\n" + shared + "ok\n",
        "Third article, nothing shared with others.\n",
        "SUBSCRIBE to  our newsletter for weekly updates\nFourth article text here.\n",
    ]
    hashes = [span_hashes(d, cfg) for d in docs]
    assert [len(h) for h in hashes] == [2, 2, 1, 2]  # "ok" is shorter than min_chars
    docs_idx = np.concatenate([np.full(len(h), i) for i, h in enumerate(hashes)])
    d, h = repeated_spans(np.concatenate(hashes), docs_idx)
    assert d.tolist() == [1, 3]  # the shared line, in docs 1 and 3 (case/space-insensitive)
    assert len(set(h.tolist())) == 1
    out = [remove_spans(t, cfg, h[d == i]) for i, t in enumerate(docs)]
    assert out[0] == docs[0]  # first occurrence kept
    assert out[1] == "Second article about mountains and snow.\nok\n"
    assert out[2] == docs[2]
    assert out[3] == "Fourth article text here.\n"


def test_three_sentence_spans_remove_covered_sentences():
    cfg = SpanDedupConfig(unit="sentences3", min_chars=20)
    rep = "The river rose overnight. Roads were closed by noon. Schools sent pupils home. "
    a = "Local news today. " + rep + "More later."
    b = "A different opening line here. " + rep + "Unrelated ending sentence."
    c = "Only two sentences here. The river rose overnight."
    ha, hb, hc = span_hashes(a, cfg), span_hashes(b, cfg), span_hashes(c, cfg)
    assert len(ha) == 5 - 2 and len(hb) == 3 and len(hc) == 0  # windows of 3 sentences
    d, h = repeated_spans(np.concatenate([ha, hb]), np.repeat([0, 1], [len(ha), len(hb)]))
    assert set(d.tolist()) == {1} and len(h) == 1  # only the window of all three repeats
    assert remove_spans(a, cfg, h[d == 0]) == a
    assert remove_spans(b, cfg, h) == "A different opening line here. Unrelated ending sentence."


def test_repeated_spans_matches_a_reference():
    rng = np.random.default_rng(1)
    hashes = rng.integers(1, 200, size=3000).astype(np.uint64)
    docs = np.sort(rng.integers(0, 300, size=3000))
    perm = rng.permutation(3000)  # input order does not matter
    d, h = repeated_spans(hashes[perm], docs[perm])
    first: dict[int, int] = {}
    for hh, dd in zip(hashes.tolist(), docs.tolist(), strict=True):
        first[hh] = min(first.get(hh, dd), dd)
    ref = sorted(
        {(dd, hh) for hh, dd in zip(hashes.tolist(), docs.tolist(), strict=True) if dd != first[hh]}
    )
    assert list(zip(d.tolist(), h.tolist(), strict=True)) == ref


def test_remove_spans_without_hits_is_identity():
    cfg = SpanDedupConfig()
    text = "line one is long enough\n\n  indented line also long enough\r\nlast"
    assert remove_spans(text, cfg, np.zeros(0, np.uint64)) == text
    assert remove_spans(text, cfg, span_hashes(text, cfg)) == "\nlast"  # short line stays


# --- MinHash ---------------------------------------------------------------------------


def test_normalization_tokenizes_like_datatrove():
    from pydoc_data.topics import topics

    simplify_text = pytest.importorskip("datatrove.utils.text").simplify_text

    texts = [topics[k][:4000] for k in sorted(topics)[:: len(topics) // 12]]
    texts.append("Le Café—naïve “quotes”, don't; 2024-01-05: ÉTÉ déjà-vu… x_y")
    for t in texts:
        t = re.sub(r"\d[.,،٫]\d", " ", t)  # datatrove keeps 3.14 as one number; lmlab as two
        ours = word_hashes(t)
        # datatrove's punctuation list misses a few marks (such as ‘), which it then keeps
        # as words; lmlab separates words at every non-alphanumeric character.
        words = [w for w in simplify_text(t).split() if any(c.isalnum() for c in w)]
        ref = [word_hashes(w) for w in words]
        assert all(len(r) == 1 for r in ref)
        assert ours.tolist() == [int(r[0]) for r in ref]


def test_threshold_and_s_curve():
    cfg = MinHashConfig()
    assert (cfg.bands, cfg.rows, cfg.ngram) == (14, 8, 5)
    assert cfg.threshold == pytest.approx((1 / 14) ** (1 / 8))
    assert cfg.threshold == pytest.approx(0.719, abs=1e-3)
    assert cfg.probability(0.8) == pytest.approx(1 - (1 - 0.8**8) ** 14)
    assert cfg.probability(0.8) == pytest.approx(0.924, abs=1e-3)  # datatrove's quoted value
    assert cfg.probability(cfg.threshold) == pytest.approx(1 - (1 - 1 / 14) ** 14)
    p = [cfg.probability(s) for s in np.linspace(0, 1, 11)]
    assert p == sorted(p) and p[0] == 0 and p[-1] == 1
    with pytest.raises(UsageError, match="4096"):
        MinHashConfig(bands=100, rows=50)


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(2)
    vocab = _vocab(rng, 4000)
    cfg = MinHashConfig(ngram=1, bands=128, rows=8, seed=3)
    errs = []
    for j_target in (0.1, 0.3, 0.5, 0.7, 0.9):
        for _ in range(4):
            words = rng.permutation(len(vocab))
            n_a = 600
            n_shared = int(round(2 * n_a * j_target / (1 + j_target)))
            a = words[:n_a]
            b = np.concatenate([a[:n_shared], words[n_a : 2 * n_a - n_shared]])
            ta = " ".join(vocab[i] for i in a)
            tb = " ".join(vocab[i] for i in rng.permutation(b))
            true = len(set(a) & set(b)) / len(set(a) | set(b))
            est = estimate_jaccard(minhash_signature(ta, cfg), minhash_signature(tb, cfg))
            assert abs(est - true) < 0.07, (true, est)  # ~4.5 sigma at 1024 hashes
            errs.append(est - true)
    assert abs(np.mean(errs)) < 0.015  # unbiased


def test_minhash_properties():
    cfg = MinHashConfig()
    text = "The quick brown fox jumps over the lazy dog, again and again, every day."
    sig = minhash_signature(text, cfg)
    assert sig.dtype == np.uint32 and sig.shape == (112,)
    assert np.array_equal(sig, minhash_signature(text.upper().replace(",", " ;"), cfg))
    assert not np.array_equal(sig, minhash_signature(text, MinHashConfig(seed=2)))
    keys = band_keys(sig, cfg)
    assert keys.dtype == np.uint64 and keys.shape == (14,) and (keys != 0).all()
    assert len(set(keys.tolist())) == 14
    empty = band_keys(minhash_signature("  ... !!! ", cfg), cfg)
    assert (empty == 0).all()  # no words: no keys, never a candidate
    assert len(shingle_hashes("two words", 5)) == 1  # shorter than n: one shingle
    huge = "Alpha, beta!\n" * 200_000  # 2.6M characters: normalized block by block
    assert np.array_equal(word_hashes(huge), np.tile(word_hashes("alpha beta"), 200_000))
    long = " ".join(["alpha beta gamma delta"] * 5000)  # 20k n-grams, several blocks
    assert np.array_equal(minhash_signature(long, cfg), minhash_signature(long[:200], cfg))


def _corpus(seed: int, n: int, n_copies: int, frac: float) -> tuple[list[str], list[int]]:
    """n distinct documents, then n_copies edited copies; returns texts and source index."""
    rng = np.random.default_rng(seed)
    vocab = _vocab(rng, 3000)
    words = [_doc(rng, vocab, int(rng.integers(150, 400))) for _ in range(n)]
    texts = [" ".join(w) for w in words]
    src = list(range(n))
    for i in rng.choice(n, size=n_copies, replace=False):
        texts.append(" ".join(_edit(rng, words[i], vocab, frac)))
        src.append(int(i))
    return texts, src


def test_planted_near_duplicates_found_and_distinct_kept():
    cfg = MinHashConfig()
    texts, src = _corpus(4, 300, 60, 0.01)
    bands = np.stack([band_keys(minhash_signature(t, cfg), cfg) for t in texts])
    roots, info = near_duplicate_clusters(bands, cfg)
    copies = np.arange(300, 360)
    assert (roots[copies] == np.asarray(src[300:])).all()  # every copy joins its original
    assert (roots[:300] == np.arange(300)).all()  # no distinct document is removed
    assert info["clusters"] == 60 and info["removed"] == 60
    assert info["size_histogram"] == {"2": 60}


def test_verify_rejects_false_candidates():
    cfg = MinHashConfig(ngram=1, bands=64, rows=1, verify=False)  # threshold 1/64: lax
    rng = np.random.default_rng(5)
    vocab = _vocab(rng, 2000)
    a = _doc(rng, vocab, 200)
    b = a[:60] + _doc(rng, vocab, 140)  # J ≈ 0.2: often a banding candidate
    sigs = np.stack([minhash_signature(" ".join(x), cfg) for x in (a, b)])
    bands = np.stack([band_keys(s, cfg) for s in sigs])
    roots, _ = near_duplicate_clusters(bands, cfg)
    assert roots.tolist() == [0, 0]
    strict = MinHashConfig(ngram=1, bands=64, rows=1, verify=True, verify_threshold=0.6)
    roots, info = near_duplicate_clusters(bands, strict, signatures=sigs)
    assert roots.tolist() == [0, 1] and info["candidate_pairs"] == 0


def _components(n: int, bands: np.ndarray) -> np.ndarray:
    """Reference: connected components by BFS over 'shares a non-zero band key'."""
    adj: list[set[int]] = [set() for _ in range(n)]
    for j in range(bands.shape[1]):
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(bands[:, j].tolist()):
            if k:
                groups.setdefault(k, []).append(i)
        for g in groups.values():
            for x in g:
                adj[x].update(g)
    root = np.full(n, -1)
    for s in range(n):
        if root[s] < 0:
            stack, root[s] = [s], s
            while stack:
                for y in adj[stack.pop()]:
                    if root[y] < 0:
                        root[y] = s
                        stack.append(y)
    return root


def test_union_find_matches_reference_and_ignores_band_order():
    rng = np.random.default_rng(6)
    n, b = 2000, 6
    bands = rng.integers(1, 1500, size=(n, b)).astype(np.uint64)  # many chained collisions
    bands[rng.random((n, b)) < 0.3] = 0
    roots, info = near_duplicate_clusters(bands, MinHashConfig(bands=b, rows=1))
    assert np.array_equal(roots, _components(n, bands))
    for perm in (rng.permutation(b), rng.permutation(b)[::-1]):
        again, _ = near_duplicate_clusters(bands[:, perm], MinHashConfig(bands=b, rows=1))
        assert np.array_equal(again, roots)
    streamed, _ = near_duplicate_clusters(
        (bands[:, j] for j in range(b)), MinHashConfig(bands=b, rows=1), n_docs=n
    )
    assert np.array_equal(streamed, roots)
    sizes = np.bincount(roots)
    assert info["documents_in_clusters"] == int(sizes[sizes > 1].sum())
    assert info["removed"] == n - len(np.unique(roots))


def test_kept_copy_is_the_earliest_in_the_cluster():
    cfg = MinHashConfig()
    texts, src = _corpus(7, 50, 20, 0.01)
    order = np.random.default_rng(8).permutation(len(texts))
    shuffled = [texts[i] for i in order]
    bands = np.stack([band_keys(minhash_signature(t, cfg), cfg) for t in shuffled])
    roots, _ = near_duplicate_clusters(bands, cfg)
    for r in np.unique(roots):
        members = np.flatnonzero(roots == r)
        assert r == members.min()
        assert len({src[order[m]] for m in members}) == 1  # one original per cluster


# --- index ------------------------------------------------------------------------------


def test_index_round_trip_and_lookup(tmp_path):
    cfg = MinHashConfig(bands=10, rows=6)
    texts, src = _corpus(9, 40, 0, 0.0)
    exact = np.array([exact_hash(t) for t in texts], dtype=np.uint64)
    bands = np.stack([band_keys(minhash_signature(t, cfg), cfg) for t in texts])
    build_index(exact, bands, cfg, tmp_path / "ref.npz")
    index = load_index(tmp_path / "ref.npz", cfg)
    assert index.documents == 40 and index.minhash.bands == 10 and index.minhash.rows == 6
    assert np.array_equal(index.exact, np.unique(exact))

    rng = np.random.default_rng(10)
    near = " ".join(_edit(rng, texts[3].split(), texts[4].split(), 0.01))
    new = _corpus(11, 1, 0, 0.0)[0][0]
    queries = [texts[0].upper(), near, new]
    qe = np.array([exact_hash(t) for t in queries], dtype=np.uint64)
    qb = np.stack([band_keys(minhash_signature(t, cfg), cfg) for t in queries])
    assert in_index(index, qe, qb).tolist() == [1, 2, 0]
    assert in_index(index, qe).tolist() == [1, 0, 0]
    assert [index_reason(t, index) for t in queries] == ["dedup_exact_index", "minhash_index", None]


def test_index_refuses_other_settings_and_bad_files(tmp_path):
    cfg = MinHashConfig()
    build_index(np.zeros(0, np.uint64), np.zeros((0, 14), np.uint64), cfg, tmp_path / "i.npz")
    load_index(tmp_path / "i.npz", MinHashConfig())
    with pytest.raises(UsageError, match=r"bands=14 \(this run: 20\)"):
        load_index(tmp_path / "i.npz", MinHashConfig(bands=20))
    with pytest.raises(UsageError, match=r"ngram=5 \(this run: 3\).*seed=1 \(this run: 2\)"):
        load_index(tmp_path / "i.npz", MinHashConfig(ngram=3, seed=2))
    (tmp_path / "bad.npz").write_bytes(b"not an index")
    with pytest.raises(UsageError, match="not a de-duplication index"):
        load_index(tmp_path / "bad.npz")


def test_is_index_only_for_an_index(tmp_path):
    cfg = MinHashConfig()
    build_index(np.zeros(0, np.uint64), np.zeros((0, 14), np.uint64), cfg, tmp_path / "i.npz")
    np.save(tmp_path / "x.npy", np.arange(3))
    np.savez(tmp_path / "other.npz", a=np.arange(3))
    (tmp_path / "notes.txt").write_text("some text\n")
    assert is_index(tmp_path / "i.npz")
    assert not is_index(tmp_path / "x.npy")
    assert not is_index(tmp_path / "other.npz")
    assert not is_index(tmp_path / "notes.txt")
    with pytest.raises(UsageError, match="x.npy: not a de-duplication index"):
        load_index(tmp_path / "x.npy")
