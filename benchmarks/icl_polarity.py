"""In-context learning on sentence polarity (Pang & Lee's sentence polarity data v1.0, the
copy `python3-pattern` ships) with SmolLM2-135M-Instruct: accuracy against the number of
demonstrations, the choice of demonstrations (random, BM25, KATE, MMR), the spread over
demonstration orders and draws (the survey's "brittle prompts", Zhao et al. §6.2),
contextual calibration (Zhao et al. 2021) and GlobalE ordering (Lu et al. 2022), all with
lmlab's own `lmlab.prompt.demos` on a `LocalBackend`.

Prompt (plain text, no chat template): each demonstration
`Review: {text}\\nSentiment: {positive|negative}\\n\\n`, then `Review: {text}\\nSentiment:`.
The label words " positive" and " negative" are scored with `label_probs` (their
log-probabilities after the prompt, normalised over the two); the larger is the
prediction. Split (seed 0): `--test-size` test sentences (half of each class), a
demonstration pool of `--pool` other sentences (half of each class).

Parts:
1. shots: k demonstrations drawn at random per test item (item i draws with seed
   `seed * 1_000_000 + i`), in the order drawn, for each k in `--ks`;
2. selection: at each k in `--sel-ks`, `bm25`, `knn` (KATE) and `mmr` (λ=`--lam`), ordered
   by similarity (least similar first, the most similar next to the query; BM25 scores
   for bm25, cosine for knn/mmr); the paired difference against part 1's random draws;
3. brittleness: `--draws` fixed draws of `--fixed-k` demonstrations (one prompt prefix
   shared by every test item, as in Zhao et al. 2021 and Lu et al. 2022), each in its
   drawn order, and for the first `--globale-draws` draws every ordering GlobalE probes;
4. calibration: part 1's configurations for k in `--cal-ks`, each item's prediction
   divided by the probabilities its own prompt gives the content-free input "N/A"
   (same demonstrations, same order); part 3's fixed prompts calibrated the same way;
5. GlobalE: `order_demos(..., "entropy")` with `--orderings` candidate orders, probed on
   `--probe` pool sentences that are not demonstrations (their labels unused); the chosen
   order's test accuracy against the candidates' (a random order's expected accuracy is
   their mean).

Run: `python benchmarks/icl_polarity.py --json icl.json` (about 30 minutes on 2 cores);
`--test-size 8 --pool 50 --ks 0 2 --sel-ks 2 --cal-ks 0 2 --fixed-k 2 --draws 2
--orderings 2 --probe 4` for a smoke run. `--report icl.json` prints the tables again.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import time
from pathlib import Path

import numpy as np
from _machine import run_and_report

DATA = "/usr/share/doc/python3-pattern/test/corpora/polarity-en-pang&lee2.csv"
LABELS = (" positive", " negative")  # label 1, label 0
CONTENT_FREE = "N/A"


# --- data ----------------------------------------------------------------------------------


def read_polarity(path: str) -> list[tuple[str, int]]:
    """(sentence, 1 or 0) for every row `label,text` (label 1 or -1)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [(text.strip(), int(label == "1")) for label, text in csv.reader(f)]


def split(rows, test_size: int, pool_size: int, seed: int):
    """A seeded, balanced split: test_size/2 and pool_size/2 sentences of each class."""
    rng = np.random.default_rng(seed)
    test, pool = [], []
    for label in (1, 0):
        idx = [i for i, (_, y) in enumerate(rows) if y == label]
        order = rng.permutation(len(idx))
        test += [rows[idx[j]] for j in order[: test_size // 2]]
        pool += [rows[idx[j]] for j in order[test_size // 2 : test_size // 2 + pool_size // 2]]
    # interleave nothing; shuffle the pool so that pool order carries no label pattern
    perm = rng.permutation(len(pool))
    return test, [pool[j] for j in perm]


def demo_text(text: str, label: int) -> str:
    return f"Review: {text}\nSentiment: {LABELS[1 - label].strip()}\n\n"


def prompt_of(pool, demos: list[int], text: str) -> str:
    return "".join(demo_text(*pool[d]) for d in demos) + f"Review: {text}\nSentiment:"


# --- scoring -------------------------------------------------------------------------------


class Scorer:
    """`label_probs` over the backend, each distinct prompt scored once (the content-free
    prompt of k=0 is one prompt; a fixed prompt's may recur). With `cache_file`, scores are
    appended there as they come (keyed by the model and a hash of the prompt) and read back
    by the next run, so an interrupted run resumes where it stopped."""

    def __init__(self, backend, model: str, cache_file: Path | None = None, chunk: int = 32):
        self.backend, self.model, self.chunk = backend, model, chunk
        self.cache: dict[str, np.ndarray] = {}
        self.seconds = 0.0
        self.prompts_scored = 0
        self.tokens_scored = 0
        self.reused = 0
        self.cache_file = cache_file
        if cache_file is not None and cache_file.is_file():
            for line in cache_file.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                self.cache[rec["key"]] = np.asarray(rec["probs"])
            print(f"{len(self.cache)} scored prompts read from {cache_file}", flush=True)

    def key(self, prompt: str) -> str:
        return hashlib.sha256(f"{self.model}\0{LABELS}\0{prompt}".encode()).hexdigest()

    def __call__(self, prompts: list[str]) -> np.ndarray:
        from lmlab.prompt.demos import label_probs

        keys = [self.key(p) for p in prompts]
        todo = sorted({p for p, k in zip(prompts, keys, strict=True) if k not in self.cache})
        self.reused += len({k for k in keys if k in self.cache})
        for s0 in range(0, len(todo), self.chunk):
            part = todo[s0 : s0 + self.chunk]
            t = time.perf_counter()
            probs = label_probs(self.backend, part, LABELS)
            self.seconds += time.perf_counter() - t
            self.prompts_scored += len(part)
            self.tokens_scored += sum(len(self.backend.tokenizer.encode(p).ids) for p in part)
            new = {self.key(p): pr for p, pr in zip(part, probs, strict=True)}
            self.cache.update(new)
            if self.cache_file is not None:
                with open(self.cache_file, "a") as f:
                    for k, pr in new.items():
                        f.write(json.dumps({"key": k, "probs": [float(x) for x in pr]}) + "\n")
        return np.stack([self.cache[k] for k in keys])


def outcome(probs: np.ndarray, labels: list[int]) -> dict:
    """Per-item correctness (label 1 = index 0 " positive") and the share said positive."""
    pred_pos = probs[:, 0] > probs[:, 1]
    correct = [float(bool(p) == bool(y)) for p, y in zip(pred_pos, labels, strict=True)]
    return {"correct": correct, "pred_positive": float(pred_pos.mean())}


def calibrated(probs: np.ndarray, cf: np.ndarray, labels) -> dict:
    from lmlab.prompt.demos import contextual_calibration

    return outcome(contextual_calibration(probs, cf), labels)


# --- the parts -----------------------------------------------------------------------------


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from lmlab.model.sentence import load_sentence_encoder
    from lmlab.prompt.backend import open_backend
    from lmlab.prompt.demos import _query_words, order_demos, pool_index, select_demos

    rows = read_polarity(args.data)
    test, pool = split(rows, args.test_size, args.pool, args.seed)
    texts = [t for t, _ in test]
    labels = [y for _, y in test]
    pool_texts = [t for t, _ in pool]
    overlap = len(set(texts) & set(pool_texts))
    res: dict = {"n_test": len(test), "n_pool": len(pool), "test_in_pool": overlap}
    print(f"{len(test)} test sentences, pool of {len(pool)} ({overlap} test texts also in pool)")

    t = time.perf_counter()
    backend = open_backend(args.model)
    res["load_s"] = time.perf_counter() - t
    score = Scorer(backend, args.model, args.cache)
    ntok = lambda p: len(backend.tokenizer.encode(p).ids)  # noqa: E731

    def evaluate(name: str, demos_per_item: list[list[int]], cal: bool = False) -> dict:
        t0 = time.perf_counter()
        prompts = [prompt_of(pool, d, x) for d, x in zip(demos_per_item, texts, strict=True)]
        out = outcome(score(prompts), labels)
        out["mean_prompt_tokens"] = float(np.mean([ntok(p) for p in prompts]))
        out["demos"] = (
            demos_per_item if len({tuple(d) for d in demos_per_item}) > 1 else [demos_per_item[0]]
        )
        if cal:
            cfp = [prompt_of(pool, d, CONTENT_FREE) for d in demos_per_item]
            out["calibrated"] = calibrated(score(prompts), score(cfp), labels)
            out["calibrated"]["content_free_prompts"] = len(set(cfp))
        out["s"] = time.perf_counter() - t0
        if args.json:  # what is done so far, in case the run is stopped
            args.json.with_suffix(".partial.json").write_text(json.dumps(res))
        acc = np.mean(out["correct"])
        extra = f", calibrated {np.mean(out['calibrated']['correct']):.3f}" if cal else ""
        print(
            f"  {name}: accuracy {acc:.3f}{extra} (says positive {out['pred_positive']:.0%}), "
            f"{out['mean_prompt_tokens']:.0f} prompt tokens, {out['s']:.0f} s",
            flush=True,
        )
        return out

    item_seed = lambda i: args.seed * 1_000_000 + i  # noqa: E731

    # 1 (+4): random draws per item
    if "shots" in args.parts:
        print("part 1: k random demonstrations per item", flush=True)
        res["shots"] = {}
        for k in args.ks:
            demos = [
                select_demos(x, pool_texts, k, "random", seed=item_seed(i))
                for i, x in enumerate(texts)
            ]
            res["shots"][str(k)] = evaluate(f"k={k} random", demos, cal=k in args.cal_ks)

    # 2: selection by similarity, ordered least similar first
    if "selection" in args.parts:
        print("part 2: bm25, knn (KATE), mmr; order by similarity", flush=True)
        t = time.perf_counter()
        vecs = pool_index(tuple(pool_texts), "knn")
        bm25 = pool_index(tuple(pool_texts), "bm25")
        qv = load_sentence_encoder().encode(texts)
        res["pool_index_s"] = time.perf_counter() - t
        res["selection"] = {}
        for k in args.sel_ks:
            for method in args.selectors:
                demos = []
                for i, x in enumerate(texts):
                    picked = select_demos(
                        x,
                        pool_texts,
                        k,
                        method,
                        seed=item_seed(i),
                        lam=args.lam,
                        pool_vectors=vecs,
                        pool_bm25=bm25,
                    )
                    if method == "bm25":
                        sim = np.asarray(bm25.get_scores(_query_words(x)))
                    else:
                        sim = (vecs @ qv[i]).numpy()
                    demos.append(
                        order_demos(picked, "similarity", similarity=[sim[j] for j in picked])
                    )
                res["selection"][f"{method}@{k}"] = evaluate(f"k={k} {method}", demos)

    # 3 (+4, 5): fixed prompts: draws, and the orders GlobalE probes
    if "fixed" in args.parts:
        print(f"part 3: fixed draws of k={args.fixed_k}, orderings, GlobalE", flush=True)
        k = args.fixed_k
        res["fixed"] = {"draws": [], "globale": []}
        for d in range(args.draws):
            drawn = select_demos("", pool_texts, k, "random", seed=10_000 + d)
            out = evaluate(f"draw {d} (drawn order)", [drawn] * len(texts), cal=True)
            out["draw"] = d
            res["fixed"]["draws"].append(out)
        for d in range(args.globale_draws):
            drawn = res["fixed"]["draws"][d]["demos"][0]
            rng = np.random.default_rng(20_000 + d)
            rest = [j for j in range(len(pool)) if j not in set(drawn)]
            probe_idx = [rest[j] for j in rng.choice(len(rest), args.probe, replace=False)]
            probed: dict[tuple, float] = {}

            def probe(order, probe_idx=probe_idx, probed=probed):
                from lmlab.prompt.demos import global_entropy

                p = score([prompt_of(pool, order, pool_texts[j]) for j in probe_idx])
                probed[tuple(order)] = global_entropy(p)
                return p

            t = time.perf_counter()
            chosen = order_demos(
                drawn, "entropy", seed=30_000 + d, probe=probe, candidates=args.orderings
            )
            probe_s = time.perf_counter() - t
            cands = []
            for j, (order, h) in enumerate(probed.items()):
                out = evaluate(
                    f"draw {d} order {j} (GlobalE {h:.3f})", [list(order)] * len(texts), cal=True
                )
                out.update(order=list(order), entropy=h, chosen=list(order) == list(chosen))
                cands.append(out)
            res["fixed"]["globale"].append(
                {"draw": d, "probe": probe_idx, "probe_s": probe_s, "candidates": cands}
            )
    res["scored"] = {
        "reused_from_cache": score.reused,
        "prompts": score.prompts_scored,
        "tokens": score.tokens_scored,
        "s": score.seconds,
    }
    return res


# --- tables --------------------------------------------------------------------------------


def acc_se(correct) -> str:
    from lmlab.eval.metrics import mean_stderr

    m, s = mean_stderr(correct)
    return f"{m:.3f} ± {s:.3f}"


def paired(a, b) -> str:
    from lmlab.eval.metrics import paired_difference

    d, s = paired_difference(a, b)
    return f"{d:+.3f} ± {s:.3f}"


def spread(values) -> str:
    v = np.asarray(values)
    return f"{v.min():.3f} / {v.max():.3f} / {v.mean():.3f} (range {v.max() - v.min():.3f})"


def report(saved: dict) -> None:
    print(saved.get("machine", "(machine not saved)"))
    print(f"command: {saved.get('command', '(not saved)')}")
    a, r = saved["args"], saved["results"]
    print(
        f"model: {a['model']}; {r['n_test']} test sentences ({r['n_test'] // 2} per class), "
        f"pool {r['n_pool']}, split seed {a['seed']}; {r['test_in_pool']} test texts also "
        f"in the pool"
    )
    sc = r["scored"]
    print(
        f"scored {sc['prompts']:,} distinct prompts ({sc['tokens']:,} prompt tokens, each "
        f"prompt run once per label word) in {sc['s']:.0f} s, "
        f"{sc.get('reused_from_cache', 0):,} lookups answered from the cache (the --cache "
        f"file or this run); model load {r['load_s']:.0f} s; wall {saved.get('wall_s', 0):.0f} s"
    )
    shots = r.get("shots", {})
    if shots:
        print()
        print("k random demonstrations per item (drawn per item, in drawn order)")
        print()
        print(
            "| k | accuracy ± SE | says positive | calibrated ± SE | calibrated says positive "
            "| calibrated − plain (paired) | prompt tokens (mean) | s |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for k, o in shots.items():
            c = o.get("calibrated")
            cal = (
                f"{acc_se(c['correct'])} | {c['pred_positive']:.0%} | "
                f"{paired(o['correct'], c['correct'])}"
                if c
                else "– | – | –"
            )
            print(
                f"| {k} | {acc_se(o['correct'])} | {o['pred_positive']:.0%} | {cal} "
                f"| {o['mean_prompt_tokens']:.0f} | {o['s']:.0f} |"
            )
    sel = r.get("selection", {})
    if sel:
        print()
        print(
            f"selection, ordered by similarity (most similar last); paired: minus the random "
            f"draws of the same k (table above); mmr λ={a['lam']}"
        )
        print()
        print(
            "| k | selection | accuracy ± SE | vs random (paired) | says positive "
            "| demo labels = query label | s |"
        )
        print("|---:|---|---:|---:|---:|---:|---:|")
        labels = r["labels"]
        pool_labels = r["pool_labels"]
        for k in a["sel_ks"]:
            rows = [("random", shots.get(str(k)))] + [
                (m, sel.get(f"{m}@{k}")) for m in a["selectors"]
            ]
            for m, o in rows:
                if o is None:
                    continue
                vs = (
                    "–"
                    if m == "random" or not shots.get(str(k))
                    else paired(shots[str(k)]["correct"], o["correct"])
                )
                same = (
                    np.mean(
                        [
                            pool_labels[j] == y
                            for d, y in zip(o["demos"], labels, strict=True)
                            for j in d
                        ]
                    )
                    if len(o["demos"]) == len(labels)
                    else float("nan")
                )
                print(
                    f"| {k} | {m} | {acc_se(o['correct'])} | {vs} | {o['pred_positive']:.0%} "
                    f"| {same:.0%} | {o['s']:.0f} |"
                )
    fx = r.get("fixed")
    if fx:
        k = a["fixed_k"]
        print()
        print(f"fixed prompts: one draw of k={k} demonstrations shared by every test item")
        print()
        print(
            "| draw | order | demo labels | accuracy ± SE | says positive | calibrated ± SE "
            "| calibrated says positive | GlobalE on probe |"
        )
        print("|---:|---|---|---:|---:|---:|---:|---:|")
        pool_labels = r["pool_labels"]
        lab = lambda d: "".join("+" if pool_labels[j] else "−" for j in d)  # noqa: E731
        for o in fx["draws"]:
            c = o["calibrated"]
            print(
                f"| {o['draw']} | drawn | {lab(o['demos'][0])} | {acc_se(o['correct'])} "
                f"| {o['pred_positive']:.0%} | {acc_se(c['correct'])} | {c['pred_positive']:.0%} "
                f"| – |"
            )
        for g in fx["globale"]:
            for j, o in enumerate(g["candidates"]):
                c = o["calibrated"]
                mark = " **(GlobalE's pick)**" if o["chosen"] else ""
                print(
                    f"| {g['draw']} | candidate {j}{mark} | {lab(o['order'])} "
                    f"| {acc_se(o['correct'])} | {o['pred_positive']:.0%} "
                    f"| {acc_se(c['correct'])} | {c['pred_positive']:.0%} | {o['entropy']:.3f} |"
                )
        print()
        print("min / max / mean accuracy (range):")
        draws = fx["draws"]
        print(
            f"- {len(draws)} draws, drawn order: {spread([np.mean(o['correct']) for o in draws])}; "
            f"calibrated: {spread([np.mean(o['calibrated']['correct']) for o in draws])}"
        )
        for g in fx["globale"]:
            cs = g["candidates"]
            acc = [np.mean(o["correct"]) for o in cs]
            cal = [np.mean(o["calibrated"]["correct"]) for o in cs]
            pick = next(o for o in cs if o["chosen"])
            pa = np.mean(pick["correct"])
            rank = 1 + sum(x > pa for x in acc)
            print(
                f"- draw {g['draw']}, {len(cs)} orders of the same demonstrations: "
                f"{spread(acc)}; calibrated: {spread(cal)}"
            )
            print(
                f"- draw {g['draw']}, GlobalE (probe of {len(g['probe'])} pool sentences, "
                f"{len(cs)} candidates, {g['probe_s']:.0f} s to probe): its pick scores "
                f"{acc_se(pick['correct'])}, rank {rank} of {len(cs)}; the candidates' mean "
                f"(a random order's expectation) {np.mean(acc):.3f}; pick minus candidate 0 "
                f"(paired) {paired(cs[0]['correct'], pick['correct'])}"
            )


def run_with_labels(args) -> dict:
    """`run`, plus the test and pool labels the tables pair against."""
    out = run(args)
    test, pool = split(read_polarity(args.data), args.test_size, args.pool, args.seed)
    return {**out, "labels": [y for _, y in test], "pool_labels": [y for _, y in pool]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--test-size", type=int, default=100)
    ap.add_argument("--pool", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["shots", "selection", "fixed"],
        choices=["shots", "selection", "fixed"],
    )
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16])
    ap.add_argument("--sel-ks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--selectors", nargs="+", default=["bm25", "knn", "mmr"])
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--cal-ks", type=int, nargs="+", default=[0, 4, 8])
    ap.add_argument("--fixed-k", type=int, default=4)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--globale-draws", type=int, default=1)
    ap.add_argument("--orderings", type=int, default=6)
    ap.add_argument("--probe", type=int, default=16)
    ap.add_argument("--json", type=Path, help="write the raw results here")
    ap.add_argument(
        "--cache", type=Path, help="keep scored prompts in this file; a rerun reuses them"
    )
    ap.add_argument("--report", type=Path, help="print the tables of a --json file, run nothing")
    args = ap.parse_args()
    run_and_report(args, run_with_labels, report, "bm25s", "sentence-transformers")


if __name__ == "__main__":
    main()
