"""`lmlab check-answer`: is this answer likely made up? Self-consistency across samples,
and, given a RAG index, each claim's support in the retrieved passages."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.errors import UsageError


@app.command("check-answer")
def check_answer(
    question: Annotated[str, typer.Argument(help="The question the answer replies to.")],
    model: Annotated[
        str | None, typer.Option(help="A model lmlab loads, or the served model's name.")
    ] = None,
    url: Annotated[str | None, typer.Option(help="An OpenAI-compatible server.")] = None,
    answer: Annotated[
        str | None, typer.Option(help="The answer to check (default: the model's greedy one).")
    ] = None,
    samples: Annotated[int, typer.Option(help="Answers sampled to compare with.")] = 5,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 128,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    index: Annotated[
        str | None, typer.Option(help="A RAG index (lmlab rag index): adds the grounded check.")
    ] = None,
    k: Annotated[int, typer.Option(help="Passages retrieved per claim.")] = 4,
    method: Annotated[str, typer.Option(help="Retrieval: bm25, dense or hybrid.")] = "hybrid",
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Score an answer to QUESTION for hallucination, from 0 (consistent, supported) to 1."""
    from lmlab.prompt.backend import open_backend
    from lmlab.trust.hallucination import grounded, selfcheck

    if not question.strip():
        raise UsageError("check-answer: the question is empty")
    if answer is not None and not answer.strip():
        raise UsageError("check-answer: --answer is empty")
    if samples < 1:
        raise UsageError(f"check-answer: --samples {samples}: must be at least 1")
    if k < 1:
        raise UsageError(f"check-answer: --k {k}: must be at least 1")
    idx = None
    if index is not None:
        from lmlab.prompt.retrieval import load_index

        idx = load_index(index)  # a bad index is refused before a model loads
    backend = open_backend(model, url)
    sc = selfcheck(backend, question, answer, samples, temperature, 1.0, max_new_tokens, seed)
    gr = grounded(idx, sc.answer, k, method) if idx is not None and sc.answer.strip() else None
    if json_out:
        print(json.dumps({"selfcheck": sc.to_dict(), "grounded": gr.to_dict() if gr else None}))
        return
    print(f"answer: {sc.answer}")
    print(
        f"self-consistency: {sc.score:.3f} (from {sc.score_from}; agreement "
        f"{sc.agreement:.2f} over {len(sc.samples)} samples, unigram {sc.unigram_score:.3f}"
        + (f", semantic {sc.semantic:.3f})" if sc.semantic is not None else ")")
    )
    for s in sc.sentences:
        sem = f" semantic {s.semantic:.3f}" if s.semantic is not None else ""
        print(f"  avg -log p {s.avg_neg_logprob:.2f}  max {s.max_neg_logprob:.2f}{sem}  {s.text}")
    if gr is not None:
        print(f"grounded: {gr.score:.3f} unsupported (soft {gr.soft_score:.3f})")
        for c in gr.claims:
            sim = f"{c.similarity:.2f}" if c.similarity is not None else "-"
            lex = f"{c.lexical:.2f}" if c.lexical is not None else "-"
            mark = "supported" if c.supported else "UNSUPPORTED"
            print(f"  {mark} (cosine {sim}, words {lex}, {c.passage or 'nothing'}): {c.claim}")
