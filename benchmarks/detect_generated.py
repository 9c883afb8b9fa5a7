"""Detecting generated text without a watermark (`lmlab.trust.detect`): AUROC of the mean
log-likelihood, the log-rank and the DetectGPT-style curvature on human passages against
SmolLM2-135M-Instruct's continuations of the same passages' first words, scored by the
same model (the white-box setting of Mitchell et al. 2023), at 50, 100 and 200 tokens.

Human text (`--source`):
- `pydocs` (default): prose passages of the Python library documentation
  (/usr/share/doc/python3.11/html/library, lmlab's html-to-text), consecutive prose
  paragraphs of one page joined until the passage is long enough. A model trained on
  web text has likely seen these pages, which makes them look more "machine" to it.
- `polarity`: Pang & Lee's movie-review sentences (the python3-pattern copy), consecutive
  rows joined (the rows are short, so a passage spans several reviews).
- `val`: the validation split of an lmlab run's token shards (`--shards`, e.g.
  runs/tiny/tokenizer/tokens): text from the model's own domain that it never trained
  on, cut into windows of whole documents' tokens and decoded, whitespace kept (code).

Machine text: the passage up to its `--prompt-words`-th word (whitespace kept), then the
model's sampled continuation (plain text, no chat template; temperature `--temperature`,
top-p `--top-p`, one seed per text; the end-of-text token is banned with a logit bias of
-100, so every continuation is long enough). Both texts keep the prompt words, as in DetectGPT. Each
score reads a text's first N tokens; the mean tokens actually scored per class are
reported, since a class that is shorter at N would be a confound.

Curvature perturbations are lmlab's character-level typos (`--perturb-rate` per letter),
not DetectGPT's T5 rewrites (see docs/detection.md).

Run: `python benchmarks/detect_generated.py --json detect.json` (100 texts per class, 20
perturbations: about an hour on 2 cores); smoke: `--n 4 --tokens 50 --perturbations 2`.
`--report detect.json` prints the table again.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
from _machine import machine

DOCS = "/usr/share/doc/python3.11/html/library"
POLARITY = "/usr/share/doc/python3-pattern/test/corpora/polarity-en-pang&lee2.csv"
WS = re.compile(r"\s+")


def prose(par: str) -> bool:
    """A paragraph of sentences, not code, a table or a heading."""
    words = par.split()
    letters = sum(c.isalpha() or c.isspace() for c in par)
    return len(words) >= 12 and letters / len(par) > 0.85 and par.rstrip()[-1:] in ".:!?)"


def pydocs_passages(docs: str, min_words: int) -> list[str]:
    from lmlab.data.keywords import HtmlConfig, html_to_text

    out = []
    for page in sorted(Path(docs).glob("*.html")):
        text, _ = html_to_text(page.read_text(errors="replace"), HtmlConfig())
        cur: list[str] = []
        for par in text.splitlines():
            par = WS.sub(" ", par).strip()
            if not par or not prose(par):
                cur = []  # a passage never spans code or headings
                continue
            cur.append(par)
            if sum(len(p.split()) for p in cur) >= min_words:
                out.append(" ".join(cur))
                cur = []
    return out


def polarity_passages(path: str, min_words: int) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        rows = [r[1].strip() for r in csv.reader(f) if len(r) >= 2 and r[1].strip()]
    out, cur = [], []
    for r in rows:
        cur.append(r)
        if sum(len(x.split()) for x in cur) >= min_words:
            out.append(" ".join(cur))
            cur = []
    return out


def val_passages(shards: str, tok, n_tokens: int) -> list[str]:
    """Non-overlapping windows of `n_tokens` inside each validation document (split at
    the end-of-text id), decoded."""
    from lmlab.data.shards import open_split

    eos = json.loads((Path(shards) / "manifest.json").read_text())["eos_id"]
    ids = np.asarray(open_split(shards, "val"))
    ends = np.flatnonzero(ids == eos).tolist() + [len(ids)]
    out, start = [], 0
    for end in ends:
        for a in range(start, end - n_tokens + 1, n_tokens):
            out.append(tok.decode(ids[a : a + n_tokens].tolist(), skip_special_tokens=True))
        start = end + 1
    return out


def prefix_words(text: str, k: int) -> str:
    """The text up to the end of its k-th whitespace-separated word, as written."""
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    return text[: ends[min(k, len(ends)) - 1]] if ends else text


def continuations(model, tok, prompts: list[str], max_new: int, args) -> list[str]:
    from lmlab.infer.generate import generate_batch
    from lmlab.infer.options import GenerationConfig
    from lmlab.prompt.likelihood import prefix_token

    eos = prefix_token(tok)
    out = []
    for i, p in enumerate(prompts):
        cfg = GenerationConfig(
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=max_new,
            logit_bias={eos: -100.0},
            seed=args.seed * 1_000_003 + i,
        )
        ids = tok.encode(p, add_special_tokens=False).ids
        (c,) = generate_batch(model, [ids], cfg)
        out.append(p + tok.decode(c.tokens, skip_special_tokens=True))
        print(f"\rgenerated {i + 1}/{len(prompts)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return out


def run(args) -> dict:
    from lmlab import load_model, load_tokenizer
    from lmlab.eval.perturb import Perturbation
    from lmlab.trust.detect import METHODS, evaluate

    tok = load_tokenizer(args.model)
    model = load_model(args.model, device=args.device)
    longest = max(args.tokens)
    min_words = int(longest * 0.9) + args.prompt_words  # ~1.3 tokens a word: enough tokens
    if args.source == "pydocs":
        passages = pydocs_passages(args.docs, min_words)
    elif args.source == "val":
        if not args.shards:
            raise SystemExit("--source val needs --shards (a run's tokenizer/tokens)")
        passages = val_passages(args.shards, tok, int(longest * 1.15) + 16)
    else:
        passages = polarity_passages(args.polarity, min_words)
    random.Random(args.seed).shuffle(passages)
    human = passages[: args.n]
    if len(human) < args.n:
        raise SystemExit(f"only {len(human)} passages of {min_words}+ words")
    prompts = [prefix_words(h, args.prompt_words) for h in human]
    t0 = time.perf_counter()
    machine_texts = continuations(model, tok, prompts, longest + 8, args)
    gen_s = time.perf_counter() - t0
    texts = human + machine_texts
    labels = [0] * len(human) + [1] * len(machine_texts)
    methods = args.methods or list(METHODS)
    rows = []
    for n in args.tokens:
        t0 = time.perf_counter()
        found = evaluate(
            model, tok, texts, labels, methods,
            max_tokens=n, perturbations=args.perturbations,
            perturbation=Perturbation("typos", args.perturb_rate), seed=args.seed,
            batch_size=args.batch_size,
        )  # fmt: skip
        lengths = np.array([s["tokens"] for s in found["scores"]])
        y = np.array(labels)
        rows.append(
            {
                "tokens": n,
                "auroc": found["auroc"],
                "mean_tokens_human": float(lengths[y == 0].mean()),
                "mean_tokens_machine": float(lengths[y == 1].mean()),
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"{n} tokens: {found['auroc']}", file=sys.stderr)
    return {
        "config": vars(args) | {"json": None, "report": None},
        "machine": machine(),
        "generation_seconds": gen_s,
        "examples": {"human": human[:2], "machine": machine_texts[:2]},
        "rows": rows,
    }


def report(saved: dict) -> None:
    cfg = saved["config"]
    print(
        f"{cfg['model']} on {cfg['source']}: {cfg['n']} human + {cfg['n']} machine texts, "
        f"{cfg['perturbations']} typo perturbations at {cfg['perturb_rate']}, "
        f"temperature {cfg['temperature']}, top-p {cfg['top_p']}"
    )
    print(saved["machine"])
    methods = list(saved["rows"][0]["auroc"])
    print("| tokens | " + " | ".join(methods) + " | mean tokens human / machine | s |")
    print("|---" * (len(methods) + 3) + "|")
    for r in saved["rows"]:
        cells = " | ".join(f"{r['auroc'][m]:.3f}" for m in methods)
        print(
            f"| {r['tokens']} | {cells} | {r['mean_tokens_human']:.0f} / "
            f"{r['mean_tokens_machine']:.0f} | {r['seconds']:.0f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--source", choices=("pydocs", "polarity", "val"), default="pydocs")
    ap.add_argument("--shards", help="--source val: a run's token shards directory")
    ap.add_argument("--docs", default=DOCS)
    ap.add_argument("--polarity", default=POLARITY)
    ap.add_argument("--n", type=int, default=100, help="texts per class")
    ap.add_argument("--tokens", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--methods", nargs="+", choices=("loglik", "logrank", "curvature"))
    ap.add_argument("--prompt-words", type=int, default=8)
    ap.add_argument("--perturbations", type=int, default=20)
    ap.add_argument("--perturb-rate", type=float, default=0.03)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--report", type=Path, help="print a saved result and exit")
    args = ap.parse_args()
    if args.report:
        report(json.loads(args.report.read_text()))
        return
    saved = run(args)
    if args.json:
        args.json.write_text(json.dumps(saved, indent=1))
    report(saved)


if __name__ == "__main__":
    main()
