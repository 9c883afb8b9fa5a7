"""`lmlab rag`: retrieval-augmented generation over the user's documents (docs/rag.md)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.console import log

rag_app = typer.Typer(
    help="Retrieval: index documents, search them, answer questions from them.",
    no_args_is_help=True,
)
app.add_typer(rag_app, name="rag")

IndexArg = Annotated[Path, typer.Argument(help="An index directory (lmlab rag index).")]
MethodOpt = Annotated[str, typer.Option(help="bm25, dense, or hybrid (reciprocal-rank fusion).")]
KOpt = Annotated[int, typer.Option("--k", "-k", help="How many passages.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")]


def _check_k(k: int) -> None:
    from lmlab.errors import UsageError

    if not 1 <= k <= 1000:
        raise UsageError(f"--k {k}: must be in [1, 1000]")


@rag_app.command("index")
def index_cmd(
    docs: Annotated[
        list[Path], typer.Argument(help="Files or folders: .txt .md .rst .html, document JSONL.")
    ],
    out: Annotated[Path, typer.Option(help="The index directory (updated if it is one).")],
    chunk_by: Annotated[str, typer.Option(help="paragraphs or tokens (words).")] = "paragraphs",
    chunk_size: Annotated[int, typer.Option(help="Words per chunk, at most.")] = 128,
    overlap: Annotated[int, typer.Option(help="Words shared by neighbouring chunks.")] = 24,
    method: Annotated[str, typer.Option(help="Build bm25, dense, or hybrid (both).")] = "hybrid",
    encoder: Annotated[
        str | None, typer.Option(help="A sentence-transformers directory (default: MiniLM).")
    ] = None,
) -> None:
    """Cut DOCS into overlapping chunks and index them for BM25 and dense retrieval. An
    existing index in OUT is updated: unchanged documents keep their chunks and
    embeddings, changed and new ones are indexed, the others stay."""
    from lmlab.errors import UsageError
    from lmlab.prompt.retrieval import Chunking, build_index

    if chunk_by not in ("paragraphs", "tokens"):
        raise UsageError(f"--chunk-by {chunk_by}: paragraphs or tokens")
    s = build_index(docs, out, Chunking(chunk_by, chunk_size, overlap), method, encoder)
    log(f"rag: {s['documents']} documents, {s['chunks']} chunks ({s['new']} new, "
        f"{s['changed']} changed, {s['unchanged']} unchanged); wrote {out}")  # fmt: skip


@rag_app.command("search")
def search_cmd(
    index: IndexArg,
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: KOpt = 5,
    method: MethodOpt = "hybrid",
    json_out: JsonOpt = False,
) -> None:
    """The K passages of INDEX that best match QUERY: rank, id (document#chunk), score."""
    from lmlab.prompt.retrieval import load_index

    _check_k(k)
    hits = load_index(index).search(query, k, method)
    if json_out:
        print(json.dumps({"query": query, "method": method, "hits": [asdict(h) for h in hits]}))
        return
    if not hits:
        print("no passage matches")
    for h in hits:
        sim = "" if h.similarity is None else f"  cosine {h.similarity:.3f}"
        print(f"{h.rank}. [{h.id}] score {h.score:.4f}{sim}\n   {h.text[:300]}\n")


@rag_app.command("ask")
def ask_cmd(
    index: IndexArg,
    question: Annotated[str, typer.Argument(help="The question.")],
    model: Annotated[
        str | None, typer.Option(help="A model lmlab loads, or the served model's name.")
    ] = None,
    url: Annotated[str | None, typer.Option(help="An OpenAI-compatible server.")] = None,
    k: KOpt = 4,
    method: MethodOpt = "hybrid",
    min_similarity: Annotated[
        float, typer.Option(help="Below this cosine nothing retrieved counts as relevant.")
    ] = 0.3,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 256,
    json_out: JsonOpt = False,
) -> None:
    """Answer QUESTION from the passages retrieved from INDEX, citing their ids; "not in
    the documents" when nothing relevant is found."""
    from lmlab.prompt.backend import open_backend
    from lmlab.prompt.rag import answer_question
    from lmlab.prompt.retrieval import load_index

    _check_k(k)
    idx = load_index(index)  # a bad index is refused before a model loads
    backend = open_backend(model, url)
    a = answer_question(idx, question, backend, k, method, min_similarity, max_new_tokens)
    if json_out:
        print(json.dumps(asdict(a)))
        return
    print(a.answer)
    if a.passages:
        cited = f"cited: {', '.join(a.citations)}" if a.citations else "none cited"
        print(f"\nsources: {', '.join(h.id for h in a.passages)} ({cited})")
