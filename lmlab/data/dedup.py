"""De-duplication at three granularities (Zhao et al. §4.1.1; Kaddour et al. §2.1).

* **exact documents**: one 64-bit hash of the normalized text per document;
* **spans**: lines, or C4's three-sentence spans (Raffel et al. 2020: "we discarded all
  but one of any three-sentence span occurring more than once"), removed from every
  document but the first that contains them;
* **near-duplicate documents**: MinHash (Broder 1997) with LSH banding; documents that
  share a band key are joined by union-find and the earliest of each cluster is kept.

The pipeline runs them in three phases so that they are parallel and resumable: each task
computes compact per-document *signatures* (`exact_hash`, `span_hashes`,
`minhash_signature` → `band_keys`), one global step decides from the signatures alone
(`exact_duplicates`, `repeated_spans`, `near_duplicate_clusters`), and each task applies
the decision (`remove_spans`). The global functions work on flat uint64 arrays by
sorting, never on a Python set or dict with one entry per document or span, so memory is
a few words per signature. "First" always means the smallest global document index
(task order, then order within the task), so the kept copy does not depend on how tasks
were scheduled, nor on band order.

An index of an existing dataset (`build_index`/`load_index`) holds its exact hashes and
band keys, sorted; `in_index`/`index_reason` look documents up with `np.searchsorted`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from lmlab.config import STRICT, Fraction, NonNegInt, PosInt
from lmlab.errors import UsageError
from lmlab.utils import atomic_path

U64 = np.uint64
_EMPTY_SIG = np.uint32(0xFFFFFFFF)  # the signature value of a document with no words

# Bump when normalization or hashing changes: an index built by another scheme would match
# nothing, silently, so `load_index` refuses it instead.
SCHEME = "lmlab-minhash-1"


# --- configs -------------------------------------------------------------------------


@dataclass
class SpanDedupConfig:
    """Which spans count, and how long one must be to be removed as a repeat.

    `min_chars` (of the normalized span) keeps short, legitimately common lines ("}",
    "Returns:", "Thank you.") out of span de-duplication. Repeats *within* one document
    are left to the Gopher repetition rules, which judge the whole document.
    """

    __pydantic_config__ = STRICT

    unit: Literal["line", "sentences3"] = "line"
    min_chars: PosInt = 20


@dataclass
class MinHashConfig:
    """MinHash-LSH settings: word n-grams, `bands` × `rows` hash functions, seed.

    Two documents become candidates when all `rows` values of at least one of the `bands`
    agree. For Jaccard similarity s that happens with probability 1 - (1 - s^rows)^bands,
    an S-curve whose steepest point is near `threshold` = (1/bands)^(1/rows): the
    defaults (datatrove's, 5-grams, 14 × 8) give 0.72, and catch pairs with s = 0.8 with
    probability 0.92 and s = 0.9 with 0.9996, while s = 0.5 slips through 5% of the time.
    More rows make the curve steeper; more bands move it left. `verify` re-checks each
    candidate pair by its estimated Jaccard (fraction of equal signature values) against
    `verify_threshold` (default: `threshold`) to drop false positives of the banding;
    it needs the full signatures, not only the band keys.
    """

    __pydantic_config__ = STRICT

    ngram: PosInt = 5
    bands: PosInt = 14
    rows: PosInt = 8
    seed: NonNegInt = 1
    verify: bool = False
    verify_threshold: Fraction | None = None

    def __post_init__(self) -> None:
        if self.bands * self.rows > 4096:
            raise UsageError(
                f"minhash: bands × rows = {self.bands * self.rows} hash functions; at most 4096"
            )

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    @property
    def threshold(self) -> float:
        """Jaccard similarity at the S-curve's steep point, (1/bands)^(1/rows)."""
        return (1.0 / self.bands) ** (1.0 / self.rows)

    def probability(self, similarity: float) -> float:
        """Probability that a pair with this Jaccard similarity becomes a candidate."""
        return 1.0 - (1.0 - similarity**self.rows) ** self.bands


# --- hashing helpers -----------------------------------------------------------------


def _h64(s: str) -> int:
    """A stable 64-bit hash of a string (Python's `hash` changes between processes)."""
    digest = hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: every input bit affects every output bit."""
    x = x ^ (x >> U64(33))
    x *= U64(0xFF51AFD7ED558CCD)
    x ^= x >> U64(33)
    x *= U64(0xC4CEB9FE1A85EC53)
    x ^= x >> U64(33)
    return x


def _random_u64(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)


# Fixed constants of the scheme (not of the config's seed): odd multipliers that make the
# combination of word hashes into an n-gram hash, and of a band's rows into a key,
# order-sensitive.
_SCHEME_SEED = 0x6C6D6C6162


@functools.cache
def _consts(n: int, salt: int) -> np.ndarray:
    return _random_u64(_SCHEME_SEED + salt, n) | U64(1)


@functools.cache
def _permutations(seed: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of k hash functions h(x) = ((a·x + b) mod 2^64) >> 32, x < 2^32.

    This is Dietzfelbinger's multiply-add-shift scheme: for 32-bit keys and random 64-bit
    a, b it is strongly universal (pairwise independent), like (a·x + b) mod p with a
    Mersenne prime, but exact in plain wrapping uint64 arithmetic: the wrap-around *is*
    the mod 2^64, so there is no overflow to get wrong and no division.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64, size=(k, 1), dtype=np.uint64, endpoint=False)
    b = rng.integers(0, 2**64, size=(k, 1), dtype=np.uint64, endpoint=False)
    return a, b


# --- normalization for MinHash: one table look-up per character ----------------------

_SEP, _MARK, _ZERO = 0, 0xFFFFFFFF, ord("0")
_WORD_POW_BITS = 12  # polynomial weights repeat every 4096 characters inside one word


@functools.cache
def _fold_table() -> np.ndarray:
    """What each BMP character becomes, built once per process (a few ms).

    A letter becomes its lowercase base letter (É → e: lowercase, NFD, keep the first
    character when the rest are combining marks), a digit becomes "0", a combining mark
    becomes `_MARK` (deleted), and everything else (punctuation, symbols, spaces) becomes
    `_SEP`, which separates words. Characters outside the BMP (emoji, rare scripts) are
    kept as they are, as word characters.
    """
    table = np.zeros(0x10000, dtype=np.uint32)
    for i in range(0x10000):
        c = chr(i)
        if c.isdecimal():
            table[i] = _ZERO
        elif c.isalnum():
            low = c.lower()[0]
            d = unicodedata.normalize("NFD", low) if ord(low) >= 0xC0 else low
            keep = len(d) > 1 and all(unicodedata.combining(x) for x in d[1:])
            table[i] = ord(d[0]) if keep else ord(low)
        elif unicodedata.category(c) == "Mn":
            table[i] = _MARK
    return table


@functools.cache
def _word_powers() -> np.ndarray:
    p = np.full(1 << _WORD_POW_BITS, U64(0x100000001B3), dtype=np.uint64)  # FNV prime
    p[0] = 1
    return np.cumprod(p, dtype=np.uint64)


_TEXT_BLOCK = 1 << 20  # characters normalized at once: bounds memory on gigantic texts


def word_hashes(text: str) -> np.ndarray:
    """64-bit hashes of the words of `text` after MinHash normalization, in order.

    Normalization as datatrove's `simplify_text`: lowercase, punctuation → space,
    diacritics removed, every number → "0" (so pages that differ only in dates, prices or
    counters still match). It runs on a uint32 array of code points with numpy: one table
    look-up folds each character, and each word's polynomial hash is a segmented sum
    (`np.add.reduceat`), with no Python loop over words or characters. Texts longer than
    `_TEXT_BLOCK` are cut at whitespace and done block by block (~40 bytes per character
    of working memory).
    """
    if len(text) <= _TEXT_BLOCK:
        return _block_word_hashes(text)
    parts, start = [], 0
    while start < len(text):
        end = start + _TEXT_BLOCK
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            end = cut + 1 if cut > start else end
        parts.append(_block_word_hashes(text[start:end]))
        start = end
    return np.concatenate(parts)


def _block_word_hashes(text: str) -> np.ndarray:
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    if cp.size == 0:
        return np.zeros(0, dtype=np.uint64)
    table = _fold_table()
    if int(cp.max()) > 0xFFFF:
        f = np.where(cp > 0xFFFF, cp, np.take(table, np.minimum(cp, 0xFFFF)))
    else:
        f = np.take(table, cp)
    digit = f == _ZERO
    drop = f == _MARK
    drop[1:] |= digit[1:] & digit[:-1]  # a run of digits becomes one "0"
    if drop.any():
        f = f[~drop]
    word = f != _SEP
    edge = np.diff(word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edge == 1)
    if starts.size == 0:
        return np.zeros(0, dtype=np.uint64)
    # Offset of each character inside its word: position minus the latest word start.
    start_of = np.zeros(f.size, dtype=np.int64)
    start_of[starts] = starts
    np.maximum.accumulate(start_of, out=start_of)
    off = np.arange(f.size, dtype=np.int64)
    off -= start_of
    off &= (1 << _WORD_POW_BITS) - 1
    vals = f.astype(np.uint64)
    vals += U64(1)  # no character weighs 0, so "a" and "a\0" differ
    vals *= np.take(_word_powers(), off)
    vals *= word  # separators after a word add nothing to its sum
    return np.add.reduceat(vals, starts)


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """One 32-bit value (in a uint64) per word n-gram; a text shorter than n is one n-gram."""
    w = word_hashes(text)
    m = w.size
    if m == 0:
        return w
    c = _consts(ngram, 1)
    if m < ngram:
        s = np.array([(w * c[:m]).sum(dtype=np.uint64)], dtype=np.uint64)
    else:
        k = m - ngram + 1
        s = w[:k] * c[0]
        for j in range(1, ngram):
            s += w[j : j + k] * c[j]
    return _mix64(s) >> U64(32)


_CHUNK = 2048  # shingles per block: (num_perm × 2048) uint64 stays in cache-sized memory


def minhash_signature(text: str, cfg: MinHashConfig) -> np.ndarray:
    """`bands × rows` minimum hash values (uint32) of the text's word n-grams.

    Value i estimates P[min h_i(A) = min h_i(B)] = Jaccard(A, B) when compared with
    another document's; long texts are processed in blocks, so memory stays bounded.
    """
    x = shingle_hashes(text, cfg.ngram)
    k = cfg.num_perm
    if x.size == 0:
        return np.full(k, _EMPTY_SIG, dtype=np.uint32)
    a, b = _permutations(cfg.seed, k)
    sig = None
    for i in range(0, x.size, _CHUNK):
        v = a * x[i : i + _CHUNK]  # (k, chunk), wraps mod 2^64 by design
        v += b
        m = v.min(axis=1)
        sig = m if sig is None else np.minimum(sig, m, out=sig)
    return (sig >> U64(32)).astype(np.uint32)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal signature values: an unbiased estimate of Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))


def band_keys(sig: np.ndarray, cfg: MinHashConfig) -> np.ndarray:
    """One uint64 key per band: a hash of the band's `rows` values, distinct per band.

    Because the band number is mixed in, keys of different bands never meet, so an index
    can keep all bands in one sorted array. 0 means "no key" (a document without words).
    """
    sig = np.asarray(sig)
    if sig.size and bool((sig == _EMPTY_SIG).all()):
        return np.zeros(cfg.bands, dtype=np.uint64)
    rows = sig.reshape(cfg.bands, cfg.rows).astype(np.uint64)
    rows *= _consts(cfg.num_perm, 2).reshape(cfg.bands, cfg.rows)
    keys = rows.sum(axis=1, dtype=np.uint64)
    keys += _consts(cfg.bands, 3)
    keys = _mix64(keys)
    keys[keys == 0] = 1
    return keys


# --- exact documents -------------------------------------------------------------------


def exact_hash(text: str) -> int:
    """64-bit hash of the text after NFC, casefold and whitespace collapsing.

    Copies of one page differ in exactly these ways: composed vs decomposed accents,
    re-wrapped or re-indented lines and CRLF from different extractors, and title or
    upper case from scrapers. Anything else (a changed word) is MinHash's job.
    """
    return _h64(" ".join(unicodedata.normalize("NFC", text).casefold().split()))


def _first_of_runs(keys: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort (key, idx) pairs; for each pair after the first of its key, (idx, first idx)."""
    order = np.lexsort((idx, keys))
    ks, gs = keys[order], idx[order]
    head = np.ones(ks.size, dtype=bool)
    head[1:] = ks[1:] != ks[:-1]
    head_pos = np.maximum.accumulate(np.where(head, np.arange(ks.size), 0))
    dup = ~head
    return gs[dup], gs[head_pos[dup]]


def exact_duplicates(hashes: np.ndarray, gidx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Documents to drop (all but the smallest index per hash), sorted, and the kept one.

    `hashes[i]` is the exact hash of document `gidx[i]`; returns `(drop, first)` with
    `first[j]` the index of the kept document that `drop[j]` duplicates.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    gidx = np.asarray(gidx, dtype=np.int64)
    drop, first = _first_of_runs(hashes, gidx)
    order = np.argsort(drop, kind="stable")
    return drop[order], first[order]


# --- spans -----------------------------------------------------------------------------

# A sentence ends at terminal punctuation (with closing quotes/brackets) followed by
# whitespace, or at a line break; the whitespace stays with the sentence so that the
# segments tile the text exactly and removing some leaves the rest untouched.
_SENT_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*(?:\s+|$)|\n\s*")


def _segments(text: str, unit: str) -> list[str]:
    if unit == "line":
        return text.splitlines(keepends=True)
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        if m.end() > start:
            out.append(text[start : m.end()])
            start = m.end()
    if start < len(text):
        out.append(text[start:])
    return out


def _spans(text: str, cfg: SpanDedupConfig) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Segments, the positions of the non-empty ones, and each span's hash and eligibility.

    For lines a span is one non-empty line; for sentences3 it is every window of three
    consecutive non-empty sentences (windows overlap, as in C4 and datatrove), and span i
    covers non-empty segments i, i+1, i+2. A segment is compared after NFC, casefold and
    whitespace collapsing; the returned segments are the text's own, untouched.
    """
    segs = _segments(text, cfg.unit)
    norms = [" ".join(unicodedata.normalize("NFC", s).casefold().split()) for s in segs]
    real = np.fromiter((i for i, s in enumerate(norms) if s), dtype=np.int64)
    h = np.fromiter((_h64(norms[i]) for i in real), dtype=np.uint64, count=real.size)
    lens = np.fromiter((len(norms[i]) for i in real), dtype=np.int64, count=real.size)
    if cfg.unit == "line":
        return segs, real, h, lens >= cfg.min_chars
    k = max(real.size - 2, 0)
    c = _consts(3, 4)
    w = _mix64(h[:k] * c[0] + h[1 : k + 1] * c[1] + h[2 : k + 2] * c[2])
    wl = lens[:k] + lens[1 : k + 1] + lens[2 : k + 2] + 2
    return segs, real, w, wl >= cfg.min_chars


def span_hashes(text: str, cfg: SpanDedupConfig) -> np.ndarray:
    """Hashes of the text's spans that are long enough to be de-duplicated, in order."""
    _, _, h, ok = _spans(text, cfg)
    return h[ok]


def repeated_spans(hashes: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which spans to remove from which document: `(doc, hash)` pairs sorted by doc, hash.

    `hashes[i]` occurs in document `docs[i]` (global index; repeats allowed). A span is
    kept in the first (smallest-index) document that has it and removed from all others.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    docs = np.asarray(docs, dtype=np.int64)
    order = np.lexsort((docs, hashes))
    h, d = hashes[order], docs[order]
    new_hash = np.ones(h.size, dtype=bool)
    new_hash[1:] = h[1:] != h[:-1]
    new_pair = new_hash.copy()
    new_pair[1:] |= d[1:] != d[:-1]
    drop = new_pair & ~new_hash  # a later document with a hash seen in an earlier one
    d, h = d[drop], h[drop]
    order = np.lexsort((h, d))
    return d[order], h[order]


def remove_spans(text: str, cfg: SpanDedupConfig, drop_hashes: np.ndarray) -> str:
    """The text without the segments covered by spans whose hash is in `drop_hashes`."""
    segs, real, h, ok = _spans(text, cfg)
    hit = ok & np.isin(h, np.asarray(drop_hashes, dtype=np.uint64))
    if not hit.any():
        return text
    span = 1 if cfg.unit == "line" else 3
    mark = np.zeros(real.size + 1, dtype=np.int64)  # +1 where a span starts, -1 after it
    start = np.flatnonzero(hit)
    np.add.at(mark, start, 1)
    np.add.at(mark, start + span, -1)
    covered = np.zeros(len(segs), dtype=bool)
    covered[real[np.cumsum(mark[:-1]) > 0]] = True
    return "".join(s for s, c in zip(segs, covered, strict=True) if not c)


# --- near duplicates: LSH candidates and union-find ----------------------------------


def _roots(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    r = parent[x]
    while True:
        rr = parent[r]
        if np.array_equal(rr, r):
            return r
        r = rr


def _union(parent: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Join the sets of each pair (u[i], v[i]), vectorized.

    An array union-find: every root is hooked under the smaller of the two roots (so a
    set's root is always its smallest member, which is what makes the kept document the
    earliest, whatever the order of bands or pairs), then the touched nodes point
    straight at their root (path compression). Repeats until no pair spans two sets.
    """
    while u.size:
        ru, rv = _roots(parent, u), _roots(parent, v)
        split = ru != rv
        if not split.any():
            break
        u, v, ru, rv = u[split], v[split], ru[split], rv[split]
        lo, hi = np.minimum(ru, rv), np.maximum(ru, rv)
        np.minimum.at(parent, hi, lo)
        parent[u] = _roots(parent, u)
        parent[v] = _roots(parent, v)


def near_duplicate_clusters(
    bands: np.ndarray | Iterable[np.ndarray],
    cfg: MinHashConfig,
    signatures: np.ndarray | None = None,
    n_docs: int | None = None,
) -> tuple[np.ndarray, dict]:
    """Cluster documents that share a band key; returns (root per document, statistics).

    `bands` is the (n_docs, bands) array of `band_keys` rows in global order, or any
    iterable of per-band key columns of length `n_docs` (so the caller can stream one band
    at a time from disk). In each band the keys are sorted and every document in a run of
    equal keys is joined to the run's first (smallest) document. `root[i] == i` for the
    document each cluster keeps, its smallest index. With `cfg.verify`, `signatures`
    (n_docs, bands × rows) are needed, and a pair is joined only when its estimated
    Jaccard reaches `verify_threshold`.
    """
    if isinstance(bands, np.ndarray):
        n_docs = bands.shape[0] if n_docs is None else n_docs
        columns: Iterable[np.ndarray] = (bands[:, j] for j in range(bands.shape[1]))
    else:
        if n_docs is None:
            raise ValueError("n_docs is required when bands are given per band")
        columns = bands
    if cfg.verify and signatures is None:
        raise ValueError("minhash verify needs the full signatures")
    thr = cfg.verify_threshold if cfg.verify_threshold is not None else cfg.threshold
    parent = np.arange(n_docs, dtype=np.int64)
    pairs = 0
    for col in columns:
        col = np.asarray(col, dtype=np.uint64)
        idx = np.flatnonzero(col)  # 0: the document has no key (no words)
        keys = col[idx]
        order = np.argsort(keys, kind="stable")  # stable: equal keys stay in index order
        ks, gs = keys[order], idx[order]
        head = np.ones(ks.size, dtype=bool)
        head[1:] = ks[1:] != ks[:-1]
        head_pos = np.maximum.accumulate(np.where(head, np.arange(ks.size), 0))
        u, v = gs[head_pos[~head]], gs[~head]
        if cfg.verify and u.size:
            same = (signatures[u] == signatures[v]).mean(axis=1)
            u, v = u[same >= thr], v[same >= thr]
        pairs += int(u.size)
        _union(parent, u, v)
    roots = _roots(parent, np.arange(n_docs, dtype=np.int64))
    sizes = np.bincount(roots, minlength=n_docs)
    size_of_cluster = sizes[sizes > 1]
    vals, counts = np.unique(size_of_cluster, return_counts=True)
    info = {
        "candidate_pairs": pairs,
        "clusters": int(size_of_cluster.size),
        "documents_in_clusters": int(size_of_cluster.sum()),
        "removed": int((roots != np.arange(n_docs)).sum()),
        "largest": int(size_of_cluster.max()) if size_of_cluster.size else 0,
        "size_histogram": {str(int(s)): int(c) for s, c in zip(vals, counts, strict=True)},
    }
    return roots, info


# --- an index of an existing dataset ---------------------------------------------------


_INDEX_KEYS = ("ngram", "bands", "rows", "seed")  # what must match between index and run


@dataclass
class DedupIndex:
    """Sorted unique exact hashes and band keys of a reference dataset, and its settings."""

    exact: np.ndarray
    bands: np.ndarray
    minhash: MinHashConfig
    documents: int
    path: str = ""


def build_index(
    exact: np.ndarray, bands: np.ndarray, cfg: MinHashConfig, path: str | Path
) -> DedupIndex:
    """Write an index (`.npz`) of a dataset's exact hashes and (n, bands) band keys."""
    exact = np.unique(np.asarray(exact, dtype=np.uint64))
    bands = np.asarray(bands, dtype=np.uint64)
    if bands.ndim != 2 or (bands.size and bands.shape[1] != cfg.bands):
        raise ValueError(f"bands must be (n_docs, {cfg.bands}), got {bands.shape}")
    keys = np.unique(bands.ravel())
    keys = keys[keys != 0]
    meta = {
        "scheme": SCHEME,
        **{k: getattr(cfg, k) for k in _INDEX_KEYS},
        "documents": int(bands.shape[0]),
    }
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, exact=exact, bands=keys, meta=np.array(json.dumps(meta)))
    return DedupIndex(exact, keys, cfg, int(bands.shape[0]), str(path))


def _open_npz(path: str | Path) -> np.lib.npyio.NpzFile:
    """Open an `.npz` archive; `np.load` hands back a bare array for an `.npy` file."""
    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError("a single array, not an .npz archive")
    return z


def is_index(path: str | Path) -> bool:
    """Whether `path` is a de-duplication index written by `build_index`."""
    try:
        with _open_npz(path) as z:
            return "meta" in z.files and json.loads(str(z["meta"])).get("scheme") == SCHEME
    except (OSError, ValueError, AttributeError):
        return False


def load_index(path: str | Path, cfg: MinHashConfig | None = None) -> DedupIndex:
    """Load an index; with `cfg`, refuse one built with other MinHash settings."""
    try:
        with _open_npz(path) as z:
            exact, keys, meta = z["exact"], z["bands"], json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{path}: not a de-duplication index ({e})") from None
    if meta.get("scheme") != SCHEME:
        raise UsageError(
            f"{path}: index uses hashing scheme {meta.get('scheme')!r}, this lmlab uses "
            f"{SCHEME!r}; rebuild it with `lmlab data index`"
        )
    built = MinHashConfig(**{k: meta[k] for k in _INDEX_KEYS})
    if cfg is not None:
        diff = [
            f"{k}={getattr(built, k)} (this run: {getattr(cfg, k)})"
            for k in _INDEX_KEYS
            if getattr(built, k) != getattr(cfg, k)
        ]
        if diff:
            raise UsageError(f"{path}: index was built with MinHash " + ", ".join(diff))
    return DedupIndex(exact, keys, built, int(meta["documents"]), str(path))


def _member(sorted_keys: np.ndarray, x: np.ndarray) -> np.ndarray:
    if sorted_keys.size == 0:
        return np.zeros(x.shape, dtype=bool)
    pos = np.searchsorted(sorted_keys, x)
    return sorted_keys[np.minimum(pos, sorted_keys.size - 1)] == x


def in_index(index: DedupIndex, exact: np.ndarray, bands: np.ndarray | None = None) -> np.ndarray:
    """Per document: 0 = new, 1 = exact duplicate, 2 = shares a band key with the index.

    `exact` holds the documents' exact hashes, `bands` their (n, bands) band keys computed
    with `index.minhash`; both are looked up with one `np.searchsorted` each.
    """
    exact = np.asarray(exact, dtype=np.uint64)
    code = np.zeros(exact.shape[0], dtype=np.int8)
    if bands is not None:
        bands = np.asarray(bands, dtype=np.uint64)
        hit = _member(index.bands, bands) & (bands != 0)
        code[hit.any(axis=1)] = 2
    code[_member(index.exact, exact)] = 1
    return code


def index_reason(text: str, index: DedupIndex) -> str | None:
    """ "dedup_exact_index" or "minhash_index" when the text duplicates the indexed data."""
    e = np.array([exact_hash(text)], dtype=np.uint64)
    if _member(index.exact, e)[0]:
        return "dedup_exact_index"
    keys = band_keys(minhash_signature(text, index.minhash), index.minhash)
    if (_member(index.bands, keys) & (keys != 0)).any():
        return "minhash_index"
    return None
