"""Canary exposure and extraction against how often a sequence was seen in pre-training.

Why: Carlini et al. 2019 ("The Secret Sharer") show exposure growing with the number of
times a canary was trained on, and Carlini et al. 2023 that extraction by prefix prompting
grows with duplication. This checks both on lmlab's own `tiny`-sized model and corpus
(the Python standard library): canaries "my secret code is NNNN" inserted 0, 1, 5, 20 and
100 times, plus planted random-word sequences repeated `--seq-repeats` times or seen once.
It reports the exposure per repeat count (exact rank among all 10^digits secrets) and the
extraction rate (greedy suffix == true suffix) of repeated versus once-seen sequences, and
of a sample of ordinary corpus documents.

Run: `python benchmarks/memorization_canaries.py` (the tiny recipe's model, 7.5 minutes of
pre-training on 2 CPU cores, then about a minute of probes); `--minutes 30 --fraction 1`
for a longer run; `--smoke` for a seconds-long check of the script itself. `--out F.json`
keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _machine import machine, peak_rss_mib  # noqa: E402

from lmlab.data.shards import write_manifest  # noqa: E402
from lmlab.data.sources.stdlib import read_stdlib  # noqa: E402
from lmlab.model import ModelConfig  # noqa: E402
from lmlab.model.loading import load_model  # noqa: E402
from lmlab.tokenizer import EOS, load_tokenizer, save_tokenizer, special_id  # noqa: E402
from lmlab.tokenizer.train import train_bpe  # noqa: E402
from lmlab.train.pretrain import PretrainConfig, pretrain  # noqa: E402
from lmlab.trust.memorization import (  # noqa: E402
    exposure,
    extract_texts,
    insert_canaries,
    make_canaries,
)
from lmlab.utils import write_json  # noqa: E402

REPEATS = [0, 1, 5, 20, 100]
WORDS = [
    "amber",
    "basil",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "garnet",
    "harbor",
    "indigo",
    "juniper",
    "kelp",
    "lotus",
    "marble",
    "nectar",
    "onyx",
    "pepper",
    "quill",
    "raven",
    "saffron",
    "tundra",
    "umber",
    "velvet",
    "willow",
    "yarrow",
]


def planted(n: int, rng: random.Random) -> list[str]:
    """Unpredictable sequences: random words and numbers (nothing in the corpus implies
    their continuation, so only memorisation can give it back)."""
    return [
        " ".join(
            rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randrange(100)) for _ in range(60)
        )
        for _ in range(n)
    ]


def write_shards(root: Path, tok, splits: dict[str, list[str]]) -> None:
    eos = special_id(tok, EOS)
    meta = {}
    for split, texts in splits.items():
        ids, starts = [], []
        for t in texts:
            starts.append(len(ids))
            ids += tok.encode(t).ids + [eos]
        np.asarray(ids, dtype=np.uint16).tofile(root / f"{split}.bin")
        np.save(root / f"{split}.idx.npy", np.asarray([*starts, len(ids)], dtype=np.int64))
        meta[split] = {
            "file": f"{split}.bin",
            "index": f"{split}.idx.npy",
            "tokens": len(ids),
            "documents": len(texts),
        }
    write_manifest(root, tok, meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=7.5, help="pre-training time budget")
    ap.add_argument("--fraction", type=float, default=0.5, help="share of stdlib documents")
    ap.add_argument("--digits", type=int, default=4, help="secret digits (|R| = 10^digits)")
    ap.add_argument("--seq-repeats", type=int, default=20, help="copies of each repeated seq")
    ap.add_argument("--seqs", type=int, default=20, help="planted sequences of each kind")
    ap.add_argument("--prefix", type=int, default=32)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a few seconds: checks the script")
    ap.add_argument("--out", type=Path, help="write the results here (JSON)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.time()

    docs = [d.text for d in read_stdlib()]
    keep = 0.01 if args.smoke else args.fraction
    docs = [d for d in docs if rng.random() < keep]
    rng.shuffle(docs)
    n_val = max(2, len(docs) // 50)
    val, docs = docs[:n_val], docs[n_val:]
    canaries = make_canaries(n=len(REPEATS), digits=2 if args.smoke else args.digits, seed=7)
    train_docs = insert_canaries(docs, canaries, REPEATS, seed=args.seed)
    rep, once = planted(args.seqs, rng), planted(args.seqs, rng)
    train_docs += [s for s in rep for _ in range(args.seq_repeats)] + once
    rng.shuffle(train_docs)

    vocab, d_model, layers, heads, ctx = (
        (512, 64, 2, 2, 128) if args.smoke else (4096, 256, 4, 4, 256)
    )
    with tempfile.TemporaryDirectory(prefix="lmlab-mem-") as tmp:
        root = Path(tmp)
        tok = train_bpe(iter(docs), vocab, 2)  # canary-free: the tokenizer does not hold them
        save_tokenizer(tok, root / "shards")
        write_shards(root / "shards", tok, {"train": train_docs, "val": val})
        mcfg = ModelConfig(
            n_layers=layers,
            d_model=d_model,
            n_heads=heads,
            vocab_size=tok.get_vocab_size(),
            max_seq_len=ctx,
        )
        cfg = PretrainConfig(
            batch_size=16,
            seq_len=ctx,
            lr=2e-3,
            warmup_steps=5 if args.smoke else 50,
            max_steps=10 if args.smoke else None,
            max_minutes=None if args.smoke else args.minutes,
            eval_every=100,
            checkpoint_every=1000,
        )
        summary = pretrain(
            mcfg,
            cfg,
            shard_dir=root / "shards",
            tokenizer_dir=root / "shards",
            out_dir=root / "run" / "pretrain",
            seed=args.seed,
            key="mem",
        )
        t_train = time.time() - t0
        model, tok = load_model(root / "run"), load_tokenizer(root / "run")
        prefix, suffix = (8, 8) if args.smoke else (args.prefix, args.suffix)
        expo = [exposure(model, tok, c) for c in canaries]
        ext_rep = extract_texts(model, tok, rep, prefix, suffix)
        ext_once = extract_texts(model, tok, once, prefix, suffix)
        ext_corpus = extract_texts(
            model, tok, rng.sample(docs, min(200, len(docs))), prefix, suffix
        )

    result = {
        "machine": machine("torch"),
        "train_seconds": round(t_train, 1),
        "train_summary": {k: v for k, v in summary.items() if isinstance(v, int | float | str)},
        "corpus_documents": len(docs),
        "exposure": [
            {k: e[k] for k in ("repeats", "secret", "rank", "candidates", "exposure")} for e in expo
        ],
        "extraction": {
            f"repeated_x{args.seq_repeats}": ext_rep["rate"],
            "seen_once": ext_once["rate"],
            "corpus_sample": ext_corpus["rate"],
            "prefix": prefix,
            "suffix": suffix,
        },
        "peak_rss_mib": peak_rss_mib(),
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
