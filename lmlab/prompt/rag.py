"""Retrieval-augmented answers (`lmlab rag ask`): the passages retrieved for a question
go into the prompt with their ids, the model is asked to answer from them alone and to
cite the ids it used; when retrieval finds nothing relevant the answer is "not in the
documents", and no model is asked."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lmlab.prompt.backend import Backend, greedy
from lmlab.prompt.retrieval import Hit, Index

NOT_FOUND = "not in the documents"
SYSTEM = (
    "Answer the question using only the passages below. Cite the id of each passage you "
    "use in square brackets, like [{example}]. If the passages do not contain the answer, "
    f"reply exactly: {NOT_FOUND}."
)
MIN_SIMILARITY = 0.3  # cosine of question and best passage under which nothing is relevant
_CITE = re.compile(r"\[([^\[\]\n]+)\]")


@dataclass
class Answer:
    question: str
    answer: str
    found: bool  # False: retrieval found nothing relevant, or the model said so
    citations: list[str] = field(default_factory=list)  # passage ids the answer cites
    passages: list[Hit] = field(default_factory=list)  # what the model was shown


def rag_messages(question: str, passages: list[Hit]) -> list[dict]:
    """The chat messages for `question` over `passages`: the instruction as the system
    turn, then the passages, each after its id, and the question."""
    context = "\n\n".join(f"[{h.id}] {h.text}" for h in passages)
    return [
        {"role": "system", "content": SYSTEM.format(example=passages[0].id)},
        {"role": "user", "content": f"Passages:\n{context}\n\nQuestion: {question}"},
    ]


def relevant(hits: list[Hit], min_similarity: float) -> list[Hit]:
    """The hits that bear on the question: by cosine similarity when the index is dense,
    else every BM25 hit (BM25 returns only chunks that share a term with the question)."""
    return [h for h in hits if h.similarity is None or h.similarity >= min_similarity]


def answer_question(
    index: Index,
    question: str,
    backend: Backend,
    k: int = 4,
    method: str = "hybrid",
    min_similarity: float = MIN_SIMILARITY,
    max_new_tokens: int = 256,
) -> Answer:
    """Retrieve, prompt, answer; citations are the bracketed ids in the answer that name a
    passage it was shown (others are dropped, not invented)."""
    passages = relevant(index.search(question, k, method), min_similarity)
    if not passages:
        return Answer(question, NOT_FOUND, False)
    cfg = greedy(max_new_tokens)
    text = backend.chat([rag_messages(question, passages)], cfg)[0][0].strip()
    shown = {h.id for h in passages}
    cited = list(dict.fromkeys(c for c in _CITE.findall(text) if c in shown))
    found = NOT_FOUND not in text.lower()
    return Answer(question, text, found, cited if found else [], passages)
