"""BPE, WordPiece and Unigram on one corpus: compression, and a model's loss per byte.

    python benchmarks/tokenizers_compare.py [--recipe tiny] [--steps 300] [--kinds bpe ...]

For each kind, the recipe runs up to pre-training in its own run directory
(`runs/tok-KIND`, its own data stage: the same documents, since the split hashes ids)
with `tokenizer.kind=KIND` and an equal budget of `--steps` optimizer steps, no time or
token limit: the same model, batch and sequence length in tokens, so the same compute.
All three pieces of a kind's vocabulary come from the same byte-level pre-tokenizer
(lmlab.tokenizer.train), so what differs is the subword algorithm.

Reported per kind: vocabulary, bytes per token on the validation split (UTF-8 bytes of
its documents over their tokens, end-of-text tokens left out), the pre-trained model's
loss on the whole validation split in consecutive windows of the training sequence
length, in nats per token and in bits per byte (`lmlab.eval.lm.lm_metrics`, whose byte
counts are exact for every kind), the tokenizer stage's time (training and token shards)
and the training time.
Bits per byte is the comparable figure: a tokenizer that compresses more has a higher
loss per token but predicts the same bytes. Finished runs are reused, so a second
invocation only rescores. `--tokenizer-only` stops each kind after its tokenizer stage:
vocabulary, bytes per token and the stage's time, no model (minutes instead of an hour
on a loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmlab.data.shards import open_split  # noqa: E402
from lmlab.eval.lm import lm_metrics  # noqa: E402
from lmlab.model.loading import load_model  # noqa: E402
from lmlab.run.recipe import load_recipe  # noqa: E402
from lmlab.run.runner import run_recipe  # noqa: E402
from lmlab.tokenizer import load_tokenizer  # noqa: E402
from lmlab.tokenizer.train import KINDS  # noqa: E402


def run_kind(
    recipe: str, kind: str, steps: int, runs_dir: Path, prefix: str, train: bool = True
) -> dict:
    overrides = [
        f"tokenizer.kind={kind}",
        f"pretrain.max_steps={steps}",
        "pretrain.max_minutes=null",
        "pretrain.max_tokens=null",
    ]
    r = load_recipe(recipe, overrides)
    run = run_recipe(r, runs_dir, f"{prefix}-{kind}", until="pretrain" if train else "tokenizer")
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    shards = json.loads((run / "tokenizer/tokens/manifest.json").read_text())["splits"]["val"]
    tok = load_tokenizer(run / "tokenizer")
    row = {
        "kind": kind,
        "vocab": tok.get_vocab_size(),
        "bytes_per_token": shards["bytes"] / (shards["tokens"] - shards["documents"]),
        "val_tokens": shards["tokens"],
        "tokenizer_s": stages["tokenizer"]["seconds"],
    }
    if not train:
        return row
    val = open_split(run / "tokenizer/tokens", "val")
    model = load_model(run / "pretrain/model")
    seq = r.pretrain.seq_len
    scores = lm_metrics(model, val, tok, seq, len(val) - 1, label=kind)
    return row | {
        "val_loss": scores["loss"],
        "bits_per_byte": scores["bits_per_byte"],
        "scored_bytes": scores["bytes"],
        "train_s": stages["pretrain"]["summary"]["seconds"],
        "steps": stages["pretrain"]["summary"]["steps"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per kind")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--runs-dir", type=Path, default=Path("runs"))
    ap.add_argument("--prefix", default="tok", help="run names are PREFIX-KIND")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument(
        "--tokenizer-only",
        action="store_true",
        help="stop after the tokenizer stage: vocabulary and bytes/token, no model",
    )
    args = ap.parse_args()
    train = not args.tokenizer_only
    rows = [
        run_kind(args.recipe, k, args.steps, args.runs_dir, args.prefix, train) for k in args.kinds
    ]
    print(
        f"\n{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"recipe {args.recipe}, {args.steps} steps per kind"
    )
    print(
        "| kind | vocab | val bytes/token | val loss (nats/token) | val bits/byte "
        "| tokenizer stage s | training s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for x in rows:
        if not train:
            print(
                f"| {x['kind']} | {x['vocab']} | {x['bytes_per_token']:.3f} | — | — | "
                f"{x['tokenizer_s']:.1f} | — |"
            )
            continue
        print(
            f"| {x['kind']} | {x['vocab']} | {x['bytes_per_token']:.3f} | {x['val_loss']:.4f} | "
            f"{x['bits_per_byte']:.4f} | {x['tokenizer_s']:.1f} | {x['train_s']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
