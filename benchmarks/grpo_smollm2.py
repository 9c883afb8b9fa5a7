"""GRPO on SmolLM2-135M-Instruct with verifiable rewards: held-out accuracy before and
after on the same items (paired, with a standard error), and the alignment tax, the
change in perplexity on English prose the reward never saw.

Run: `python benchmarks/grpo_smollm2.py` (trains with `lmlab align grpo`, ~8 minutes on
2 cores), or `--trained DIR` to evaluate a model already trained with the same settings.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PROSE = (
    "The village sat at the edge of a wide valley, where the river slowed and spread into "
    "shallow pools before it reached the sea. Every spring the farmers waited for the water "
    "to fall, then walked the fields to see which walls had survived the floods. The older "
    "ones remembered a year when the river changed its course overnight, leaving the mill "
    "dry and the bridge standing over nothing but mud and stones."
)
TRAIN = ["--task", "addition", "--difficulty", "1", "--steps", "30", "--batch-size", "4",
         "--group-size", "4", "--max-completion", "24", "--lr", "5e-6", "--heldout", "64",
         "--prompts", "120"]  # fmt: skip


def per_item(model, tok, items, max_completion: int) -> list[float]:
    """Each item's greedy reward (1 = the exact answer), the measure `align grpo` reports."""
    from lmlab.adapt.grpo import rewards_for, sample
    from lmlab.infer.options import GenerationConfig
    from lmlab.tokenizer.chat import stop_ids_of

    gen = GenerationConfig(max_new_tokens=max_completion, stop_ids=stop_ids_of(tok, chat=True))
    _, comps = sample(model, tok, items, gen)
    texts = [c.text or "" for c in comps]
    return rewards_for("addition", texts, [it.answer for it in items], 0.0).tolist()


@torch.no_grad()
def perplexity(model, tok, text: str) -> float:
    ids = torch.tensor([tok.encode(text).ids])
    logp = torch.log_softmax(model(ids[:, :-1]).float(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).mean()
    return math.exp(float(nll))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--trained", default=None, help="an `align grpo` output to evaluate")
    args = ap.parse_args()
    from lmlab.eval.metrics import paired_difference
    from lmlab.eval.synthetic import make_items
    from lmlab.model.loading import load_model, resolve_checkpoint
    from lmlab.tokenizer import load_tokenizer

    tmp = tempfile.mkdtemp()
    trained = args.trained
    if trained is None:
        trained = str(Path(tmp) / "grpo")
        cmd = [
            sys.executable,
            "-m",
            "lmlab.cli",
            "align",
            "grpo",
            args.model,
            "--out",
            trained,
            *TRAIN,
        ]
        subprocess.run(cmd, check=True)
    train_items = make_items("addition", 120, 1, 0, split="train")
    held = make_items(
        "addition", 64, 1, 0, split="test", exclude=[it.question for it in train_items]
    )
    base_path = resolve_checkpoint(args.model)
    tok = load_tokenizer(base_path)
    before_m, after_m = load_model(base_path).eval(), load_model(Path(trained) / "model").eval()
    before, after = per_item(before_m, tok, held, 24), per_item(after_m, tok, held, 24)
    diff, se = paired_difference(before, after)
    print(f"held-out addition (difficulty 1, {len(held)} items, greedy, exact answer):")
    print(f"  before {sum(before) / len(before):.3f}  after {sum(after) / len(after):.3f}  "
          f"after - before {diff:+.3f} ± {se:.3f} (paired SE)")  # fmt: skip
    pb, pa = perplexity(before_m, tok, PROSE), perplexity(after_m, tok, PROSE)
    print(f"alignment tax: perplexity on held-out prose {pb:.2f} -> {pa:.2f} ({pa / pb - 1:+.1%})")


if __name__ == "__main__":
    main()
