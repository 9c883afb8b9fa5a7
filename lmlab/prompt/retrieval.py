"""Retrieval (Kaddour et al.'s remedy for hallucination and outdated knowledge; Zhao et al.
§6 on retrieval-augmented generation): documents cut into overlapping chunks, a BM25
index (the `bm25s` package), a dense index (a sentence encoder, all-MiniLM-L6-v2 by
default, `lmlab.model.sentence`), and both fused by reciprocal-rank fusion (Cormack et
al. 2009: score = Σ 1 / (60 + rank)).

An index is a directory:
- `index.json`: the format, how chunks were cut, the encoder, and per document its
  source, content hash and chunk ids;
- `chunks.jsonl`: one chunk per line, `id` (`DOC#N`), `doc`, `text`;
- `dense.safetensors`: the chunks' unit embeddings, in the order of `chunks.jsonl`;
- `bm25/`: the `bm25s` index over the same chunks.

Indexing again into the same directory updates it: a document whose text is unchanged
keeps its chunks and embeddings, a changed or new one is cut and embedded, and documents
not named this time stay. BM25's statistics cover the whole corpus, so it is rebuilt (in
seconds). The directory is replaced atomically: a failed run leaves the old index."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lmlab.console import progress
from lmlab.errors import CheckpointError, UsageError
from lmlab.utils import atomic_dir, claim_output_dir, read_jsonl, write_json, write_jsonl

FORMAT = "lmlab-rag-1"
KIND = "rag-index"
RRF_K = 60  # reciprocal-rank fusion's constant (Cormack et al. 2009)
METHODS = ("bm25", "dense", "hybrid")
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".html", ".htm", ".jsonl"}
_WORD = re.compile(r"\S+")


@dataclass
class Chunking:
    """How documents are cut: `by` "tokens" (windows of `size` words, `overlap` words
    shared by neighbours) or "paragraphs" (blank-line paragraphs packed up to `size`
    words; a longer one is cut as by tokens; the last paragraph of a chunk starts the
    next when it is at most `overlap` words). 128 words stay under the MiniLM encoder's
    256 word pieces, so dense retrieval sees a whole chunk."""

    by: Literal["tokens", "paragraphs"] = "paragraphs"
    size: int = 128
    overlap: int = 24

    def __post_init__(self) -> None:
        if self.size < 8:
            raise UsageError(f"--chunk-size {self.size}: must be at least 8 words")
        if not 0 <= self.overlap < self.size // 2:
            raise UsageError(
                f"--overlap {self.overlap}: must be in [0, {self.size // 2}) (half a chunk)"
            )


@dataclass
class Chunk:
    id: str
    doc: str
    text: str


@dataclass
class Hit:
    """A retrieved chunk: its rank (1 = best), score (BM25, cosine, or fused), and the
    cosine similarity to the query when the index is dense (what "relevant" is judged by)."""

    rank: int
    id: str
    doc: str
    score: float
    text: str
    similarity: float | None = None


def _windows(words: list[str], size: int, overlap: int) -> list[str]:
    step = size - overlap
    starts = range(0, max(len(words) - overlap, 1), step)
    return [" ".join(words[s : s + size]) for s in starts]


def chunk_text(text: str, cfg: Chunking) -> list[str]:
    """`text` cut as `cfg` says; whitespace inside a chunk is collapsed to single spaces."""
    if cfg.by == "tokens":
        words = _WORD.findall(text)
        return _windows(words, cfg.size, cfg.overlap) if words else []
    chunks: list[str] = []
    current: list[list[str]] = []
    for para in re.split(r"\n\s*\n", text):
        words = _WORD.findall(para)
        if not words:
            continue
        if len(words) > cfg.size:  # one long paragraph: windows of its own
            if current:
                chunks.append(" ".join(w for p in current for w in p))
                current = []
            chunks.extend(_windows(words, cfg.size, cfg.overlap))
            continue
        if current and sum(map(len, current)) + len(words) > cfg.size:
            chunks.append(" ".join(w for p in current for w in p))
            last = current[-1]
            current = [last] if len(last) <= cfg.overlap else []
        current.append(words)
    if current:
        chunks.append(" ".join(w for p in current for w in p))
    return chunks


def read_documents(paths: list[str | Path]) -> list[tuple[str, str, str]]:
    """(document id, text, source) of every document under `paths`: text files (.txt,
    .md, .rst), HTML pages (their visible text, by the data pipeline's html-to-text
    step), and lmlab's document JSONL (`id`, `text`: one document per line). A folder is
    read recursively, in sorted order. The id of a file is its path relative to the
    folder given (or its name)."""
    from lmlab.data.keywords import HtmlConfig, html_to_text

    out: list[tuple[str, str, str]] = []
    for given in map(Path, paths):
        if not given.exists():
            raise UsageError(f"{given}: no such file or folder")
        files = (
            sorted(p for p in given.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if given.is_dir()
            else [given]
        )
        for f in files:
            name = str(f.relative_to(given)) if given.is_dir() else f.name
            try:
                raw = f.read_text(errors="replace")
            except OSError as e:
                raise UsageError(f"{f}: unreadable ({e.strerror})") from None
            if f.suffix == ".jsonl":
                for i, rec in enumerate(read_jsonl(f), 1):
                    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                        raise UsageError(f"{f}:{i}: a document needs a string 'text'")
                    out.append((str(rec.get("id", f"{name}:{i}")), rec["text"], str(f)))
            elif f.suffix in (".html", ".htm"):
                out.append((name, html_to_text(raw, HtmlConfig())[0], str(f)))
            else:
                out.append((name, raw, str(f)))
    ids = [d for d, _, _ in out]
    if len(set(ids)) != len(ids):
        dup = next(d for d in ids if ids.count(d) > 1)
        raise UsageError(f"document id {dup!r} appears twice; give each document once")
    return out


# --- BM25 ----------------------------------------------------------------------------------


def _bm25s():
    try:
        import bm25s
    except ImportError:
        raise UsageError("BM25 retrieval needs bm25s: pip install bm25s (or lmlab[rag])") from None
    return bm25s


def bm25_tokens(texts: list[str]):
    """bm25s's own tokenisation (lower case, English stop words removed)."""
    return _bm25s().tokenize(texts, stopwords="en", show_progress=False)


def build_bm25(texts: list[str]):
    index = _bm25s().BM25()  # Lucene's BM25, k1 = 1.5, b = 0.75
    index.index(bm25_tokens(texts), show_progress=False)
    return index


# --- the index -----------------------------------------------------------------------------


@dataclass
class Index:
    """Chunks with their BM25 index and dense embeddings (either may be absent)."""

    chunking: Chunking
    chunks: list[Chunk]
    docs: dict[str, dict] = field(default_factory=dict)  # id -> source, sha256, chunk ids
    dense: torch.Tensor | None = None
    encoder: str | None = None  # the sentence encoder's directory
    bm25: object | None = None
    _encoder: object | None = None

    def encode(self, texts: list[str]) -> torch.Tensor:
        from lmlab.model.sentence import load_sentence_encoder

        if self._encoder is None:
            self._encoder = load_sentence_encoder(self.encoder)
        return self._encoder.encode(texts)

    def encode_all(self, texts: list[str], batch: int = 256) -> torch.Tensor:
        """`encode` with a progress bar, for indexing."""
        parts = []
        with progress("embedding chunks", total=len(texts)) as bar:
            for s in range(0, len(texts), batch):
                parts.append(self.encode(texts[s : s + batch]))
                bar.update(len(parts[-1]))
        return torch.cat(parts)

    def _bm25_ranked(self, query: str, k: int) -> list[tuple[int, float]]:
        if self.bm25 is None or not self.chunks:
            return []
        tokens = bm25_tokens([query])
        if not tokens.ids[0]:  # only stop words or unknown: nothing matches
            return []
        docs, scores = self.bm25.retrieve(tokens, k=min(k, len(self.chunks)), show_progress=False)
        return [(int(d), float(s)) for d, s in zip(docs[0], scores[0], strict=True) if s > 0]

    def _dense_ranked(self, q: torch.Tensor, k: int) -> list[tuple[int, float]]:
        from lmlab.model.sentence import cosine_top

        rows, sims = cosine_top(q, self.dense, k)
        return list(zip(rows, sims, strict=True))

    def search(self, query: str, k: int = 5, method: str = "hybrid") -> list[Hit]:
        """The k best chunks for `query` by `method`."""
        if method not in METHODS:
            raise UsageError(f"--method {method}: choose one of {', '.join(METHODS)}")
        if method in ("dense", "hybrid") and self.dense is None:
            raise UsageError(f"--method {method}: this index has no dense part (build with it)")
        if method in ("bm25", "hybrid") and self.bm25 is None:
            raise UsageError(f"--method {method}: this index has no BM25 part (build with it)")
        q = self.encode([query])[0] if self.dense is not None else None
        if method == "bm25":
            ranked = self._bm25_ranked(query, k)
        elif method == "dense":
            ranked = self._dense_ranked(q, k)
        else:
            pool = max(4 * k, 50)  # each list deep enough that fusion sees its tail
            fused: dict[int, float] = {}
            for ranking in (self._bm25_ranked(query, pool), self._dense_ranked(q, pool)):
                for r, (i, _) in enumerate(ranking, 1):
                    fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + r)
            ranked = sorted(fused.items(), key=lambda x: (-x[1], x[0]))[:k]
        hits = []
        for r, (i, s) in enumerate(ranked, 1):
            c = self.chunks[i]
            sim = float(self.dense[i] @ q) if q is not None else None
            hits.append(Hit(r, c.id, c.doc, s, c.text, sim))
        return hits

    # --- files ---

    def save(self, out: Path) -> None:
        """Write the index to `out` atomically (the directory is replaced whole)."""
        from safetensors.torch import save_file

        with atomic_dir(out, kind=KIND) as tmp:
            write_json(
                tmp / "index.json",
                {
                    "format": FORMAT,
                    "chunking": asdict(self.chunking),
                    "encoder": self.encoder,
                    "parts": [
                        p for p, x in (("bm25", self.bm25), ("dense", self.dense)) if x is not None
                    ],
                    "docs": self.docs,
                },
            )
            write_jsonl(tmp / "chunks.jsonl", (asdict(c) for c in self.chunks))
            if self.dense is not None:
                save_file({"embeddings": self.dense.contiguous()}, str(tmp / "dense.safetensors"))
            if self.bm25 is not None:
                self.bm25.save(str(tmp / "bm25"))


def load_index(path: str | Path) -> Index:
    """An index directory, checked: a wrong or damaged one is refused naming the file."""
    root = Path(path)
    meta_file = root / "index.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{root}: not an lmlab retrieval index ({meta_file.name}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UsageError(f"{meta_file}: not an lmlab retrieval index (format {FORMAT})")
    where = root / "chunks.jsonl"
    try:
        chunks = [Chunk(**r) for r in read_jsonl(where)]
        index = Index(
            Chunking(**meta["chunking"]), chunks, meta["docs"], encoder=meta.get("encoder")
        )
        if "dense" in meta["parts"]:
            from safetensors.torch import load_file

            where = root / "dense.safetensors"
            index.dense = load_file(str(where))["embeddings"]
            if index.dense.shape[0] != len(chunks):
                raise ValueError(f"{index.dense.shape[0]} embeddings for {len(chunks)} chunks")
        if "bm25" in meta["parts"]:
            where = root / "bm25"
            index.bm25 = _bm25s().BM25.load(str(where))
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: damaged retrieval index ({e})") from None
    return index


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def build_index(
    paths: list[str | Path],
    out: str | Path,
    chunking: Chunking | None = None,
    method: str = "hybrid",
    encoder: str | None = None,
) -> dict:
    """Index the documents under `paths` into `out` (`lmlab rag index`), or update the
    index already there. `method` says which parts to build (hybrid: both). Returns
    counts: documents, chunks, and how many documents were new, changed or unchanged."""
    if method not in METHODS:
        raise UsageError(f"--method {method}: choose one of {', '.join(METHODS)}")
    out = claim_output_dir(out, KIND, resume=True)  # a user's folder is never replaced
    old = load_index(out) if (out / "index.json").is_file() else None
    if old is not None and chunking is not None and asdict(chunking) != asdict(old.chunking):
        raise UsageError(
            f"{out}: was cut with {asdict(old.chunking)}; index into a new directory to "
            "change how documents are cut"
        )
    chunking = chunking or (old.chunking if old else Chunking())
    docs = read_documents(paths)
    if not docs and old is None:
        raise UsageError("no documents found (.txt, .md, .rst, .html, .jsonl)")
    keep = {} if old is None else {c.id: (i, c) for i, c in enumerate(old.chunks)}
    all_docs = dict(old.docs) if old else {}
    chunks: list[Chunk] = []
    vectors: list[torch.Tensor | None] = []
    stats = {"new": 0, "changed": 0, "unchanged": 0}
    for doc_id, text, source in docs:
        sha, before = _sha(text), all_docs.get(doc_id)
        if before is not None and before["sha256"] == sha:
            stats["unchanged"] += 1
            continue
        stats["changed" if before else "new"] += 1
        pieces = chunk_text(text, chunking)
        ids = [f"{doc_id}#{n}" for n in range(len(pieces))]
        all_docs[doc_id] = {"source": source, "sha256": sha, "chunks": ids}
        for cid, piece in zip(ids, pieces, strict=True):
            keep[cid] = (None, Chunk(cid, doc_id, piece))
    for info in all_docs.values():  # in document order, the new texts included
        for cid in info["chunks"]:
            i, c = keep[cid]
            chunks.append(c)
            reuse = old is not None and old.dense is not None and i is not None
            vectors.append(old.dense[i] if reuse else None)
    index = Index(chunking, chunks, all_docs, encoder=encoder or (old.encoder if old else None))
    if method in ("dense", "hybrid"):
        todo = [n for n, v in enumerate(vectors) if v is None]
        fresh = index.encode_all([chunks[n].text for n in todo]) if todo else None
        for j, n in enumerate(todo):
            vectors[n] = fresh[j]
        index.dense = torch.stack(vectors)
    if method in ("bm25", "hybrid") and chunks:
        index.bm25 = build_bm25([c.text for c in chunks])
    index.save(out)
    return {"documents": len(all_docs), "chunks": len(chunks), **stats}
