"""Retrieval on the Python documentation: lmlab's retrieval index (`lmlab.prompt.retrieval`,
what `lmlab rag index/search` run) over the `library/` pages of Debian's python3.11-doc
HTML, with known-item questions built from the pages' own descriptions; and its indexing
and query speed against the libraries used directly (`bm25s`, `sentence-transformers`)
on the same chunk texts, in the same process.

Corpus: every `.html` page under `--docs` (or a seeded subset of `--pages` of them), read by
`read_documents` (HTML -> visible text by lmlab's html-to-text step), cut by the default
chunking (paragraphs packed to 128 words, 24 words of overlap).

Questions: every documented function, method, class or exception of the corpus pages
(`<dl class="py function|method|...">`, `<dt ... id="NAME">`, then `<dd><p>DESCRIPTION`)
whose first description sentence has 6 to 60 words, is found in at least one chunk of its
own page and is not shared with another entry; of those, taken in an order drawn with
`--seed`, the first `--questions` whose sentence is in no chunk of any other page. The
question is `Which {function|method|class|exception} does the following: {the sentence,
its last full stop dropped, with NAME and NAME's last dotted part removed}?`; the gold
chunks are the chunks of that page whose text contains the sentence (whitespace
collapsed). Reported: recall@1/@5/@10 (a gold chunk among the top k), MRR@10 (1/rank
of the first gold chunk, 0 past 10), and page-level recall@1/@10 (a chunk of the right
page), for bm25, dense and hybrid.

Speed: `build_index(method="hybrid")` with its parts timed (reading + html-to-text +
chunking, the BM25 part, the dense part, saving) by wrapping lmlab's own functions; then
`bm25s` (tokenize + index) and `SentenceTransformer(...).encode(texts, batch_size=64)` on
the same chunk texts. Query latency: median ms per question for `Index.search` by each
method (on the hybrid index; BM25 also on a BM25-only index, because `search` embeds the
query whenever the index has a dense part, to report each hit's cosine similarity), and
for bm25s (tokenize + retrieve) and sentence-transformers (encode + one matrix product +
top-k) directly.

Answers (`--answers N`, default 40, the first N questions; 0 skips): SmolLM2-135M-Instruct
answers each question once with retrieval (`answer_question`, what `lmlab rag ask` runs:
the hybrid index's top `--answer-k` passages above the relevance threshold, the model told
to answer from them and cite their ids) and once without (the question alone, "Answer
with its name only."), greedy, 48 new tokens at most. An answer is correct when it
contains the entry's name (its last dotted part, as a whole word). Reported: accuracy
with and without retrieval and their paired difference, how often a gold passage was in
the prompt, how often the answer cited one, and how often it said "not in the documents".

Run: `python benchmarks/rag_pydocs.py --json rag.json`; `--pages 3 --questions 10` for a
smoke run. `--report rag.json` prints the tables again.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import run_and_report

DOCS = "/usr/share/doc/python3.11/html/library"
KINDS = {
    "function": "function",
    "method": "method",
    "classmethod": "method",
    "staticmethod": "method",
    "class": "class",
    "exception": "exception",
}
ENTRY = re.compile(
    r'<dl class="py (' + "|".join(KINDS) + r')">\s*<dt class="sig sig-object py" id="([^"]+)">'
    r".*?</dt>\s*(?:<dt\b.*?</dt>\s*)*<dd>\s*<p>(.*?)</p>",
    re.DOTALL,
)
TAG = re.compile(r"<[^>]+>")
WS = re.compile(r"\s+")
# a full stop, ! or ? then space ends a sentence, unless it ends e.g., i.e., etc., vs. or cf.
SENTENCE_END = re.compile(
    r"(?<=[.!?])(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\betc\.)(?<!\bvs\.)(?<!\bcf\.)\s+"
)


# --- questions -----------------------------------------------------------------------------


def norm(text: str) -> str:
    return WS.sub(" ", text).strip()


def entries(page: str, raw: str) -> list[dict]:
    """(page, name, kind, first sentence) of each documented object with a description."""
    out = []
    for kind, name, para in ENTRY.findall(raw):
        text = norm(html.unescape(TAG.sub("", para)))
        first = SENTENCE_END.split(text, maxsplit=1)[0]
        out.append({"page": page, "name": name, "kind": KINDS[kind], "sentence": first})
    return out


def question(e: dict) -> str:
    s = e["sentence"]
    for n in sorted({e["name"], e["name"].rsplit(".", 1)[-1]}, key=len, reverse=True):
        s = re.sub(r"(?<![\w.])" + re.escape(n) + r"(\(\))?(?![\w])", "", s)
    s = norm(re.sub(r"\s+([,.;:)])", r"\1", s)).rstrip(".")
    return f"Which {e['kind']} does the following: {s}?"


def make_questions(files: list[Path], chunks, n: int, seed: int) -> tuple[list[dict], dict]:
    """Known-item questions and the counts of what was dropped on the way."""
    by_doc: dict[str, list[int]] = {}
    for i, c in enumerate(chunks):
        by_doc.setdefault(c.doc, []).append(i)
    cands = [e for f in files for e in entries(f.name, f.read_text(errors="replace"))]
    counts = {"entries": len(cands)}
    seen: dict[str, int] = {}
    for e in cands:
        seen[e["sentence"]] = seen.get(e["sentence"], 0) + 1
    kept, drop = (
        [],
        {"length": 0, "shared_sentence": 0, "not_in_page_chunks": 0, "in_other_pages": 0},
    )
    for e in cands:
        if not 6 <= len(e["sentence"].split()) <= 60:
            drop["length"] += 1
            continue
        if seen[e["sentence"]] > 1:
            drop["shared_sentence"] += 1
            continue
        gold = [chunks[i].id for i in by_doc.get(e["page"], []) if e["sentence"] in chunks[i].text]
        if not gold:
            drop["not_in_page_chunks"] += 1
            continue
        kept.append({**e, "gold": gold})
    # a sentence also in another page's chunks cannot be told apart: dropped. Checked in a
    # seeded order until enough are kept (the check scans every chunk)
    rng = np.random.default_rng(seed)
    ok = []
    for i in rng.permutation(len(kept)):
        e = kept[i]
        if any(c.doc != e["page"] and e["sentence"] in c.text for c in chunks):
            drop["in_other_pages"] += 1
        else:
            ok.append(e)
        if len(ok) == n:
            break
    counts.update(drop, candidates=len(kept), examined=int(len(ok) + drop["in_other_pages"]))
    ok.sort(key=lambda e: (e["page"], e["name"]))
    qs = [{**e, "question": question(e)} for e in ok]
    return qs, counts


# --- measurement ---------------------------------------------------------------------------


class Timed:
    """Wraps a module's function (or a class's method) and adds up the seconds it takes."""

    def __init__(self, owner, name: str) -> None:
        self.owner, self.name, self.s, self.calls = owner, name, 0.0, 0
        self.orig = getattr(owner, name)
        timed = self

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return timed.orig(*a, **kw)
            finally:
                timed.s += time.perf_counter() - t
                timed.calls += 1

        setattr(owner, name, wrapper)

    def restore(self) -> None:
        setattr(self.owner, self.name, self.orig)


def ranks(qs: list[dict], hits_per_q: list[list[str]], chunk_doc: dict) -> dict:
    r1 = r5 = r10 = mrr = d1 = d10 = 0.0
    per = []
    for q, ids in zip(qs, hits_per_q, strict=True):
        gold = set(q["gold"])
        rank = next((i for i, c in enumerate(ids[:10], 1) if c in gold), None)
        drank = next((i for i, c in enumerate(ids[:10], 1) if chunk_doc[c] == q["page"]), None)
        per.append(rank)
        r1 += rank is not None and rank <= 1
        r5 += rank is not None and rank <= 5
        r10 += rank is not None
        mrr += 1 / rank if rank else 0.0
        d1 += drank == 1
        d10 += drank is not None
    n = len(qs)
    return {
        "recall@1": r1 / n,
        "recall@5": r5 / n,
        "recall@10": r10 / n,
        "mrr@10": mrr / n,
        "page_recall@1": d1 / n,
        "page_recall@10": d10 / n,
        "ranks": per,
    }


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from lmlab.prompt import retrieval
    from lmlab.prompt.retrieval import Index, build_index, load_index

    root = Path(args.docs)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".html", ".htm"))
    n_all = len(files)
    if args.pages:
        rng = np.random.default_rng(args.seed)
        files = [files[i] for i in sorted(rng.choice(len(files), args.pages, replace=False))]
    import bm25s  # imported before the timed build, so neither side pays for the import

    res: dict = {"pages": len(files), "pages_available": n_all}
    print(f"{len(files)} of {n_all} pages", flush=True)

    with tempfile.TemporaryDirectory(prefix="rag_pydocs-") as tmp:
        out = Path(tmp) / "index"
        timers = {
            "read": Timed(retrieval, "read_documents"),
            "bm25": Timed(retrieval, "build_bm25"),
            "dense": Timed(retrieval.Index, "encode_all"),
            "save": Timed(retrieval.Index, "save"),
        }
        t = time.perf_counter()
        counts = build_index([root] if not args.pages else files, out, method="hybrid")
        total = time.perf_counter() - t
        for x in timers.values():
            x.restore()
        build = {k: x.s for k, x in timers.items()}
        build["total"] = total
        build["chunk_and_rest"] = total - (
            build["read"] + build["bm25"] + build["dense"] + build["save"]
        )
        res["build"] = build
        res["counts"] = counts
        print(
            f"build_index: {counts}; {json.dumps({k: round(v, 2) for k, v in build.items()})}",
            flush=True,
        )
        index = load_index(out)
    chunks = index.chunks
    texts = [c.text for c in chunks]
    n = len(texts)
    from lmlab.model.sentence import load_sentence_encoder

    t = time.perf_counter()
    load_sentence_encoder(index.encoder)  # what the dense part's time includes, once
    res["build"]["encoder_load_s"] = time.perf_counter() - t
    index.encode(["warm up"])  # loads the index's encoder
    enc = index._encoder  # noqa: SLF001
    lens = [len(e.ids) for e in enc.tokenizer.encode_batch(texts)]
    words = [len(t.split()) for t in texts]
    res["chunk_stats"] = {
        "words_mean": float(np.mean(words)),
        "wordpieces_mean": float(np.mean(lens)),
        "truncated_share": float(np.mean([x >= enc.max_len for x in lens])),
        "max_len": enc.max_len,
    }

    # --- the libraries directly, on the same chunk texts
    t = time.perf_counter()
    toks = bm25s.tokenize(texts, stopwords="en", show_progress=False)
    t_tok = time.perf_counter() - t
    direct_bm25 = bm25s.BM25()
    direct_bm25.index(toks, show_progress=False)
    t_bm25 = time.perf_counter() - t
    res["bm25s"] = {"tokenize_s": t_tok, "total_s": t_bm25}
    print(f"bm25s direct: {t_bm25:.2f} s ({t_tok:.2f} s tokenizing)", flush=True)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from lmlab.model.sentence import default_encoder_dir

    t = time.perf_counter()
    st = SentenceTransformer(str(default_encoder_dir()), device="cpu")
    st_load = time.perf_counter() - t
    st_texts = texts[: args.st_limit] if args.st_limit else texts
    t = time.perf_counter()
    st_emb = st.encode(st_texts, batch_size=64, convert_to_tensor=True, show_progress_bar=False)
    st_s = time.perf_counter() - t
    st_emb = st_emb.float().cpu()
    ours = index.dense[: len(st_texts)]
    diff = (ours - st_emb).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(ours, st_emb, dim=-1).min().item()
    res["st"] = {
        "load_s": st_load,
        "encode_s": st_s,
        "chunks": len(st_texts),
        "max_abs_diff": diff,
        "min_cosine": cos,
    }
    print(
        f"sentence-transformers: {len(st_texts)} chunks in {st_s:.1f} s (load {st_load:.1f} s);"
        f" vs lmlab's embeddings max |diff| {diff:.2e}, min cosine {cos:.6f}",
        flush=True,
    )
    if args.st_limit and args.st_limit < n:  # lmlab's encoder on the same subset, for the ratio
        t = time.perf_counter()
        index.encode_all(st_texts)
        res["st"]["lmlab_encode_same_s"] = time.perf_counter() - t

    # --- questions
    files_in = [f for f in files if f.name in index.docs] or files
    qs, qcounts = make_questions(files_in, chunks, args.questions, args.seed)
    res["question_counts"] = qcounts
    res["questions"] = [{k: q[k] for k in ("page", "name", "kind", "question", "gold")} for q in qs]
    print(f"questions: {len(qs)} ({qcounts})", flush=True)
    chunk_doc = {c.id: c.doc for c in chunks}
    ids = [c.id for c in chunks]
    questions = [q["question"] for q in qs]
    k = 10
    bm25_only = Index(index.chunking, chunks, index.docs, bm25=index.bm25)
    emb = st_emb if len(st_texts) == n else index.dense

    def bm25s_direct(q):
        qt = bm25s.tokenize([q], stopwords="en", show_progress=False)
        docs, scores = direct_bm25.retrieve(qt, k=k, show_progress=False)
        return [ids[int(d)] for d, s in zip(docs[0], scores[0], strict=True) if s > 0]

    def st_direct(q):
        v = st.encode([q], convert_to_tensor=True, show_progress_bar=False)[0].float()
        return [ids[i] for i in torch.topk(emb @ v, k).indices.tolist()]

    def lmlab(ix, method):
        return lambda q: [h.id for h in ix.search(q, k=k, method=method)]

    fns = {
        "bm25": lmlab(index, "bm25"),
        "dense": lmlab(index, "dense"),
        "hybrid": lmlab(index, "hybrid"),
        "bm25_only_index": lmlab(bm25_only, "bm25"),
        "bm25s_direct": bm25s_direct,
        "st_direct_dense": st_direct,
    }
    for q in questions[:2]:  # warm-up
        for fn in fns.values():
            fn(q)
    times: dict[str, list[float]] = {m: [] for m in fns}
    hits: dict[str, list[list[str]]] = {m: [] for m in fns}
    for q in questions:  # interleaved, so that a slow moment of the machine hits all alike
        for m, fn in fns.items():
            t = time.perf_counter()
            hits[m].append(fn(q))
            times[m].append(1000 * (time.perf_counter() - t))
    res["methods"] = {}
    for m in fns:
        r = ranks(qs, hits[m], chunk_doc)
        res["methods"][m] = {
            **r,
            "median_ms": statistics.median(times[m]),
            "p90_ms": float(np.percentile(times[m], 90)),
        }
        print(
            f"  {m}: R@1 {r['recall@1']:.3f} R@5 {r['recall@5']:.3f} R@10 {r['recall@10']:.3f} "
            f"MRR@10 {r['mrr@10']:.3f}; {statistics.median(times[m]):.1f} ms",
            flush=True,
        )

    def same(a: str, b: str) -> float:
        return float(np.mean([x == y for x, y in zip(hits[a], hits[b], strict=True)]))

    res["agreement"] = {
        "bm25s_vs_lmlab_bm25": same("bm25s_direct", "bm25"),
        "bm25_only_vs_hybrid_index": same("bm25_only_index", "bm25"),
        "st_vs_lmlab_dense": same("st_direct_dense", "dense"),
    }
    if args.answers:
        res["answers"] = answers(args, index, qs[: args.answers])
    return res


def mentions(text: str, name: str) -> bool:
    return re.search(r"(?<![\w])" + re.escape(name) + r"(?![\w])", text) is not None


def answers(args, index, qs: list[dict]) -> dict:
    """Each question answered with retrieval (`lmlab rag ask`'s path) and without."""
    from lmlab.prompt.backend import greedy, open_backend
    from lmlab.prompt.rag import answer_question

    backend = open_backend(args.model)
    out: dict = {"with": [], "without": []}
    for q in qs:
        name = q["name"].rsplit(".", 1)[-1]
        t = time.perf_counter()
        a = answer_question(index, q["question"], backend, k=args.answer_k, max_new_tokens=48)
        out["with"].append(
            {
                "answer": a.answer,
                "correct": mentions(a.answer, name),
                "found": a.found,
                "gold_shown": any(h.id in q["gold"] for h in a.passages),
                "gold_cited": any(c in q["gold"] for c in a.citations),
                "cited": len(a.citations),
                "s": time.perf_counter() - t,
            }
        )
        t = time.perf_counter()
        turn = [{"role": "user", "content": f"{q['question']} Answer with its name only."}]
        text = backend.chat([turn], greedy(48))[0][0].strip()
        out["without"].append(
            {"answer": text, "correct": mentions(text, name), "s": time.perf_counter() - t}
        )
        w, wo = out["with"][-1], out["without"][-1]
        print(f"  {name}: with {w['correct']:d} ({w['answer'][:60]!r}), without {wo['correct']:d}")
    return out


# --- tables --------------------------------------------------------------------------------


def report(saved: dict) -> None:
    print(saved.get("machine", "(machine not saved)"))
    print(f"command: {saved.get('command', '(not saved)')}")
    a, r = saved["args"], saved["results"]
    c, cs = r["counts"], r["chunk_stats"]
    print(
        f"corpus: {r['pages']} of {r['pages_available']} pages under {a['docs']} "
        f"({'all' if not a['pages'] else 'seeded subset, seed ' + str(a['seed'])}); "
        f"{c['documents']} documents, {c['chunks']:,} chunks (mean {cs['words_mean']:.0f} "
        f"words, {cs['wordpieces_mean']:.0f} word pieces; {cs['truncated_share']:.1%} reach the "
        f"encoder's {cs['max_len']}-piece limit and are truncated for dense)"
    )
    qc = r["question_counts"]
    print(
        f"questions: {len(r['questions'])} (seed {a['seed']}) of {qc['entries']} documented "
        f"entries: dropped {qc['length']} whose first sentence is outside 6-60 words, "
        f"{qc['shared_sentence']} whose sentence several entries share, "
        f"{qc['not_in_page_chunks']} whose sentence is in no chunk of its page; of the "
        f"{qc['candidates']} left, {qc['examined']} examined in seeded order, "
        f"{qc['in_other_pages']} of them dropped because the sentence is also in another page"
    )
    for q in r["questions"][:3]:
        print(f"  e.g. {q['name']} ({q['page']}): {q['question']}")
    print()
    print(
        "| method | recall@1 | recall@5 | recall@10 | MRR@10 | page recall@1 | page recall@10 "
        "| query ms (median) | query ms (p90) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = {
        "bm25": "lmlab bm25",
        "bm25_only_index": "lmlab bm25, BM25-only index",
        "dense": "lmlab dense",
        "hybrid": "lmlab hybrid (RRF)",
        "bm25s_direct": "bm25s direct",
        "st_direct_dense": "sentence-transformers direct",
    }
    for m, name in names.items():
        x = r["methods"][m]
        print(
            f"| {name} | {x['recall@1']:.3f} | {x['recall@5']:.3f} | {x['recall@10']:.3f} "
            f"| {x['mrr@10']:.3f} | {x['page_recall@1']:.3f} | {x['page_recall@10']:.3f} "
            f"| {x['median_ms']:.1f} | {x['p90_ms']:.1f} |"
        )
    ag = r["agreement"]
    print(
        f"\nsame top 10 as lmlab's: bm25s direct {ag['bm25s_vs_lmlab_bm25']:.0%} of the "
        f"questions (BM25-only index {ag['bm25_only_vs_hybrid_index']:.0%}), "
        f"sentence-transformers direct {ag['st_vs_lmlab_dense']:.0%} (vs lmlab dense). "
        "lmlab bm25 on the hybrid index embeds the query too (for each hit's cosine); on a "
        "BM25-only index it does not."
    )
    b, n = r["build"], c["chunks"]
    st, bs = r["st"], r["bm25s"]
    print()
    print("| indexing | seconds | chunks/s | lmlab / library (time) |")
    print("|---|---:|---:|---:|")
    print(f"| lmlab build_index (hybrid), whole | {b['total']:.1f} | {n / b['total']:.1f} | – |")
    print(f"| — reading pages + html-to-text | {b['read']:.1f} | {n / b['read']:.1f} | – |")
    print(f"| — chunking and bookkeeping | {b['chunk_and_rest']:.1f} | – | – |")
    print(
        f"| — BM25 part (build_bm25) | {b['bm25']:.2f} | {n / b['bm25']:.0f} "
        f"| {b['bm25'] / bs['total_s']:.2f}× |"
    )
    print(
        f"| — dense part (encode_all) | {b['dense']:.1f} | {n / b['dense']:.1f} "
        + (f"| {b['dense'] / st['encode_s']:.2f}× |" if st["chunks"] == n else "| see below |")
    )
    print(f"| — saving | {b['save']:.2f} | – | – |")
    print(f"| (lmlab's encoder load, inside the dense part) | {b['encoder_load_s']:.2f} | – | – |")
    print(
        f"| bm25s direct (tokenize + index) | {bs['total_s']:.2f} | {n / bs['total_s']:.0f} | – |"
    )
    print(
        f"| sentence-transformers encode (batch 64), {st['chunks']:,} chunks "
        f"| {st['encode_s']:.1f} | {st['chunks'] / st['encode_s']:.1f} | – |"
    )
    if "lmlab_encode_same_s" in st:
        s2 = st["lmlab_encode_same_s"]
        print(
            f"| lmlab encode_all, the same {st['chunks']:,} chunks | {s2:.1f} "
            f"| {st['chunks'] / s2:.1f} | {s2 / st['encode_s']:.2f}× |"
        )
    print(
        f"\nsentence-transformers loaded in {st['load_s']:.1f} s; its embeddings against lmlab's "
        f"(the index's): max |diff| {st['max_abs_diff']:.2e}, min cosine {st['min_cosine']:.6f}"
    )
    if "answers" in r:
        report_answers(a, r["answers"])


def report_answers(a: dict, ans: dict) -> None:
    w, wo = ans["with"], ans["without"]
    n = len(w)
    cw = np.array([x["correct"] for x in w], float)
    cwo = np.array([x["correct"] for x in wo], float)

    def se(x: np.ndarray) -> float:
        return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")

    print(f"\nanswers by {a.get('model', 'smollm2-135m-instruct')}, {n} questions:\n")
    print("| condition | correct ± SE | gold passage shown | cites a gold passage "
          "| says not in the documents | s/question |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    shown = np.mean([x["gold_shown"] for x in w])
    cited = np.mean([x["gold_cited"] for x in w])
    nf = np.mean([not x["found"] for x in w])
    print(
        f"| with retrieval (hybrid, k={a.get('answer_k', 4)}) | {cw.mean():.3f} ± {se(cw):.3f} "
        f"| {shown:.0%} | {cited:.0%} | {nf:.0%} | {np.mean([x['s'] for x in w]):.1f} |"
    )
    print(
        f"| without retrieval | {cwo.mean():.3f} ± {se(cwo):.3f} | – | – | – "
        f"| {np.mean([x['s'] for x in wo]):.1f} |"
    )
    d = cw - cwo
    print(f"\nwith − without (paired): {d.mean():+.3f} ± {se(d):.3f}")
    print(f"  e.g. with: {w[0]['answer'][:120]!r}\n  without: {wo[0]['answer'][:120]!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", default=DOCS)
    ap.add_argument("--pages", type=int, default=0, help="a seeded subset of N pages (0: all)")
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--st-limit",
        type=int,
        default=0,
        help="encode only the first N chunks with sentence-transformers (0: all)",
    )
    ap.add_argument("--answers", type=int, default=40, help="questions answered (0: none)")
    ap.add_argument("--answer-k", type=int, default=4, help="passages in the answer's prompt")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the answering model")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    ap.add_argument("--report", type=Path, help="print the tables of a --json file, run nothing")
    args = ap.parse_args()
    run_and_report(args, run, report, "bm25s", "sentence-transformers", "transformers")


if __name__ == "__main__":
    main()
