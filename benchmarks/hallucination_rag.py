"""Do lmlab's hallucination scores (`lmlab.trust.hallucination`) tell wrong answers from
right ones? Measured on the known-item questions of `rag_pydocs.py` (the Python docs'
`library/` pages, "Which function does the following: ...?"), whose answers are known.

SmolLM2-135M-Instruct answers each question greedily, twice: without retrieval (the
question alone, "Answer with its name only.", as `rag_pydocs.py` asks it) and with it
(`answer_question`: the hybrid index's top `--k` passages in the prompt, what `lmlab rag
ask` runs). An answer is correct when it names the entry (its last dotted part, as a whole
word); "not in the documents" is an abstention, counted and left out of the AUROCs.

Each answer gets, from the same prompt it was written from (`--samples` more answers at
temperature 1, 48 new tokens):
- `selfcheck`: the per-answer score (1 - agreement for a short answer, the semantic
  score for a longer one, as RAG answers citing passages often are), and each part
  alone: `disagreement` (1 - agreement), `unigram` (the normalised SelfCheck-Unigram
  score), `avg_nlp` and `avg_max_nlp` (the paper's passage-level Avg(-log p) and
  Avg(Max(-log p))), `semantic` (MiniLM);
- `grounded`: the answer's claims checked in the same index, k = `--k` (`grounded`, the
  share of unsupported claims, and `grounded_soft`); for a bare name a claim says little,
  so also `claim_*`: the claim "ANSWER: DESCRIPTION" (the answer with the question's
  description), which the passage stating the description supports only when it names
  the answer.

Reported per condition: accuracy, abstentions, and each score's AUROC for telling a wrong
answer from a right one (the probability that a random wrong answer scores higher than a
random right one, ties counting half; 0.5 = chance).

Run: `python benchmarks/hallucination_rag.py --json hallu.json` (all pages indexed, 100
questions, 5 samples; about an hour on 2 cores); `--pages 10 --questions 5 --samples 2`
for a smoke run. `--report hallu.json` prints the table again.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _machine import run_and_report
from rag_pydocs import DOCS, make_questions, mentions

SCORES = ("selfcheck", "disagreement", "unigram", "avg_nlp", "avg_max_nlp", "semantic",
          "grounded", "grounded_soft", "claim_grounded", "claim_grounded_soft")  # fmt: skip


def auroc(scores: list[float], wrong: list[bool]) -> float | None:
    """P(score of a wrong answer > score of a right one), ties half (Mann-Whitney U / n1 n0);
    None when one class is empty."""
    pos = [s for s, w in zip(scores, wrong, strict=True) if w]
    neg = [s for s, w in zip(scores, wrong, strict=True) if not w]
    if not pos or not neg:
        return None
    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (len(pos) * len(neg)))


def scored(backend, index, messages: list[dict], answer: str, q: dict, args) -> dict:
    """Every score of one answer, written from `messages`."""
    from lmlab.trust.hallucination import grounded, selfcheck

    sc = selfcheck(backend, messages, answer, args.samples, max_new_tokens=48, seed=args.seed)
    desc = q["question"].split("does the following: ", 1)[-1].rstrip("?")
    gr = grounded(index, answer, args.k) if answer.strip() else None
    claim = grounded(index, f"{answer.strip()}: {desc}.", args.k)
    return {
        "selfcheck": sc.score,
        "disagreement": 1.0 - sc.agreement,
        "unigram": sc.unigram_score,
        "avg_nlp": sc.avg_neg_logprob,
        "avg_max_nlp": sc.avg_max_neg_logprob,
        "semantic": sc.semantic,
        "grounded": gr.score if gr else 1.0,
        "grounded_soft": gr.soft_score if gr else 1.0,
        "claim_grounded": claim.score,
        "claim_grounded_soft": claim.soft_score,
        "samples": sc.samples,
    }


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from lmlab.prompt.backend import greedy, open_backend
    from lmlab.prompt.rag import answer_question, rag_messages
    from lmlab.prompt.retrieval import build_index, load_index

    root = Path(args.docs)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".html", ".htm"))
    if args.pages:
        rng = np.random.default_rng(args.seed)
        files = [files[i] for i in sorted(rng.choice(len(files), args.pages, replace=False))]
    out: dict = {"pages": len(files), "with": [], "without": []}
    with tempfile.TemporaryDirectory(prefix="hallucination_rag-") as tmp:
        build_index(files, Path(tmp) / "index", method="hybrid")
        index = load_index(Path(tmp) / "index")
        qs, counts = make_questions(files, index.chunks, args.questions, args.seed)
        out["question_counts"] = counts
        backend = open_backend(args.model)
        for q in qs:
            name = q["name"].rsplit(".", 1)[-1]
            turn = [{"role": "user", "content": f"{q['question']} Answer with its name only."}]
            text = backend.chat([turn], greedy(48))[0][0].strip()
            row = {"name": q["name"], "answer": text, "correct": mentions(text, name)}
            out["without"].append({**row, **scored(backend, index, turn, text, q, args)})
            a = answer_question(index, q["question"], backend, k=args.k, max_new_tokens=48)
            row = {"name": q["name"], "answer": a.answer, "correct": mentions(a.answer, name)}
            if a.found:
                msgs = rag_messages(q["question"], a.passages)
                row.update(scored(backend, index, msgs, a.answer, q, args))
            out["with"].append({**row, "abstained": not a.found})
            w, wo = out["with"][-1], out["without"][-1]
            ws = w.get("selfcheck", float("nan"))
            print(
                f"  {name}: without {wo['correct']:d} {wo['selfcheck']:.2f}, "
                f"with {w['correct']:d} {ws:.2f}",
                flush=True,
            )
    return out


def report(saved: dict) -> None:
    print(saved.get("machine", "(machine not saved)"))
    print(saved.get("command", ""))
    res = saved["results"]
    print(f"\n{res['pages']} pages; questions: {res['question_counts']}")
    header = f"{'score':<22}" + "".join(f"{c:>18}" for c in ("without retrieval", "with"))
    rows: dict[str, list[str]] = {s: [] for s in SCORES}
    stats = []
    for cond in ("without", "with"):
        items = [r for r in res[cond] if not r.get("abstained")]
        wrong = [not r["correct"] for r in items]
        acc = sum(r["correct"] for r in res[cond]) / max(len(res[cond]), 1)
        absn = sum(bool(r.get("abstained")) for r in res[cond])
        stats.append(f"{acc:.3f} ({absn} abst.)")
        for s in SCORES:
            pairs = [(r[s], w) for r, w in zip(items, wrong, strict=True) if r.get(s) is not None]
            a = auroc([p for p, _ in pairs], [w for _, w in pairs]) if pairs else None
            rows[s].append("-" if a is None else f"{a:.3f}")
    print("\nAUROC of each score for wrong vs right answers (0.5 = chance)")
    print(header)
    print(f"{'accuracy':<22}" + "".join(f"{x:>18}" for x in stats))
    for s in SCORES:
        print(f"{s:<22}" + "".join(f"{x:>18}" for x in rows[s]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", default=DOCS)
    ap.add_argument("--pages", type=int, default=0, help="a seeded subset of N pages (0: all)")
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--samples", type=int, default=5, help="answers sampled per check")
    ap.add_argument("--k", type=int, default=4, help="passages per prompt and per claim")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the answering model")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    ap.add_argument("--report", type=Path, help="print the table of a --json file, run nothing")
    args = ap.parse_args()
    run_and_report(args, run, report)


if __name__ == "__main__":
    main()
