"""The KGW watermark on SmolLM2-135M-Instruct: detection rate and false-positive rate at
50/100/200 tokens for γ ∈ {0.25, 0.5} and δ ∈ {1, 2}, and the perplexity cost.

Prompts: the first `--prompt-words` words of `--n` Pang & Lee movie-review sentences
(seeded draw; the python3-pattern copy). For each (γ, δ), each prompt is continued by
sampling (temperature 1, top-p 1, 200 new tokens, the end-of-text token banned with a
logit bias of -100 so every continuation is long enough), in one batch, with lmlab's
watermark (lefthash, the default key) on; once more with no watermark. Detection
(`lmlab.trust.watermark.detect`, repeated bigrams ignored, z > 4) reads the first 50, 100
and 200 generated tokens. The false-positive rate is the share of unwatermarked
continuations, and of human text (other Pang & Lee sentences joined to 200 tokens),
called watermarked by each γ's detector. Perplexity: each continuation's tokens scored by
the same model without the watermark, exp(mean negative log-likelihood) over all
generated tokens of a setting; the cost is its ratio to the unwatermarked one.

Run: `python benchmarks/watermark_rates.py --json wm.json` (50 prompts: about 15 minutes
on 2 cores); `--n 4 --tokens 50` for a smoke run; `--report wm.json` prints the table.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np
from _machine import run_and_report

POLARITY = "/usr/share/doc/python3-pattern/test/corpora/polarity-en-pang&lee2.csv"
SETTINGS = [(0.25, 1.0), (0.25, 2.0), (0.5, 1.0), (0.5, 2.0)]
LENGTHS = (50, 100, 200)


def sentences(path: str) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [t.strip() for _, t in csv.reader(f) if t.strip()]


def nll(model, prompt_ids: list[int], gen: list[int]) -> list[float]:
    """-log p of each generated token after the prompt, under the model as it is (no
    watermark): one forward of prompt + continuation."""
    import torch

    ids = torch.tensor([prompt_ids + gen])
    with torch.no_grad():
        out = model(ids)
    logits = (out.logits if hasattr(out, "logits") else out)[0].float()
    lp = logits[len(prompt_ids) - 1 : -1].log_softmax(-1)
    return (-lp.gather(-1, torch.tensor(gen)[:, None])[:, 0]).tolist()


def run(args) -> dict:
    import torch

    from lmlab import load_model, load_tokenizer
    from lmlab.infer import GenerationConfig, generate_batch
    from lmlab.infer.options import WatermarkConfig
    from lmlab.tokenizer import EOS, special_id
    from lmlab.trust.watermark import detect

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    vocab = model.cfg.vocab_size
    rows = sentences(args.data)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(rows))
    picked = [rows[i] for i in order[: args.n]]
    prompts = [" ".join(s.split()[: args.prompt_words]) for s in picked]
    prompt_ids = [tok.encode(p).ids for p in prompts]
    human_rows = [rows[i] for i in order[args.n :]]
    human, cur = [], []
    for s in human_rows:  # other sentences joined until `tokens` tokens
        cur += tok.encode(" " + s).ids
        if len(cur) >= args.tokens:
            human.append(cur[: args.tokens])
            cur = []
        if len(human) == args.n:
            break
    eos = special_id(tok, EOS)
    out: dict = {"prompts": prompts, "settings": {}}
    for gamma, delta in [(None, None), *SETTINGS]:
        wm = WatermarkConfig(gamma=gamma, delta=delta) if gamma is not None else None
        cfg = GenerationConfig(
            max_new_tokens=args.tokens, temperature=1.0, top_p=1.0, seed=args.seed,
            logit_bias={eos: -100.0}, watermark=wm,
        ).validate()  # fmt: skip
        t = time.perf_counter()
        comps = generate_batch(model, prompt_ids, cfg, tokenizer=tok)
        secs = time.perf_counter() - t
        gens = [c.tokens for c in sorted(comps, key=lambda c: c.prompt_index)]
        losses = [x for p, g in zip(prompt_ids, gens, strict=True) for x in nll(model, p, g)]
        key = "none" if gamma is None else f"g{gamma}_d{delta}"
        rec: dict = {
            "gamma": gamma,
            "delta": delta,
            "gen_s": secs,
            "mean_len": float(np.mean([len(g) for g in gens])),
            "ppl": math.exp(float(np.mean(losses))),
            "z": {},
        }
        for g in sorted({s[0] for s in SETTINGS}):
            det = WatermarkConfig(gamma=g)
            for n in LENGTHS:
                if n > args.tokens:
                    continue
                rec["z"][f"g{g}_{n}"] = [
                    detect(x[:n], vocab, det)["z"] for x in gens if len(x) >= n
                ]
        out["settings"][key] = rec
        print(f"  {key}: ppl {rec['ppl']:.2f}, {secs:.0f} s", flush=True)
    out["human_z"] = {
        f"g{g}_{n}": [detect(h[:n], vocab, WatermarkConfig(gamma=g))["z"] for h in human]
        for g in sorted({s[0] for s in SETTINGS})
        for n in LENGTHS
        if n <= args.tokens
    }
    return out


def report(saved: dict) -> None:
    print(saved["machine"])
    print(saved["command"])
    r = saved["results"]
    s = r["settings"]
    base = s["none"]["ppl"]
    lengths = [n for n in LENGTHS if any(f"_{n}" in k for k in s["none"]["z"])]
    head = " | ".join(f"detected at {n}" for n in lengths)
    print(f"\n| γ | δ | {head} | perplexity | cost |")
    print("|---:|---:|" + "---:|" * len(lengths) + "---:|---:|")
    for key, x in s.items():
        if key == "none":
            continue
        cells = []
        for n in lengths:
            z = np.array(x["z"][f"g{x['gamma']}_{n}"])
            cells.append(f"{np.mean(z > 4):.0%} (median z {np.median(z):.1f})")
        print(f"| {x['gamma']} | {x['delta']:g} | {' | '.join(cells)} | {x['ppl']:.2f} "
              f"| {x['ppl'] / base - 1:+.1%} |")  # fmt: skip
    print(f"\nno watermark: perplexity {base:.2f}")
    print(
        "\n| detector γ | text | " + " | ".join(f"false positives at {n}" for n in lengths) + " |"
    )
    print("|---:|---|" + "---:|" * len(lengths))
    for g in sorted({x["gamma"] for k, x in s.items() if k != "none"}):
        for name, zs in (("SmolLM2, no watermark", s["none"]["z"]), ("human", r["human_z"])):
            cells = []
            for n in lengths:
                z = np.array(zs.get(f"g{g}_{n}", []))
                cells.append(f"{np.mean(z > 4):.0%} of {len(z)} (max z {z.max():.1f})"
                             if len(z) else "–")  # fmt: skip
            print(f"| {g} | {name} | {' | '.join(cells)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=POLARITY)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--prompt-words", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--report", type=Path)
    args = ap.parse_args()
    run_and_report(args, run, report)


if __name__ == "__main__":
    main()
