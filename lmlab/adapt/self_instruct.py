"""Self-instruct (Wang et al. 2023; Zhao et al. §5.1.1): a model writes new instructions
from a few examples of a seed pool, keeps those unlike everything it already has, and
answers them, growing an instruction set from a handful of seeds.

The filter is the paper's: a candidate is kept when its ROUGE-L F-measure against every
instruction in the pool (seeds and those kept so far) is below the threshold (0.7), it
has 3 to 150 words, and it does not ask for what a text model cannot give (images,
graphs, files). The records written are Alpaca's (`instruction`, `input`, `output`), which
`lmlab sft --data` reads.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rouge_score import rouge_scorer

from lmlab.console import log
from lmlab.errors import UsageError
from lmlab.infer.generate import generate_batch
from lmlab.infer.options import GenerationConfig
from lmlab.model.loading import load_model, resolve_checkpoint
from lmlab.tokenizer import load_tokenizer
from lmlab.tokenizer.chat import encode_chat, stop_ids_of
from lmlab.utils import claim_output_file, write_text

UNSUITABLE = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
              "map", "maps", "draw", "plot", "go to")  # fmt: skip


def read_seeds(path: str | Path) -> list[str]:
    """Seed instructions: JSONL records with an `instruction` (Alpaca's, or the paper's
    seed_tasks.jsonl), or plain lines of text."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such seed file")
    seeds = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str):
                raise UsageError(f"{path}:{n}: field 'instruction' is missing or not a string")
            line = rec["instruction"]
        seeds.append(line)
    if len(seeds) < 2:
        raise UsageError(f"{path}: self-instruct needs at least 2 seed instructions")
    return seeds


def why_rejected(candidate: str, pool: list[str], scorer, threshold: float) -> str | None:
    """None when `candidate` may join the pool, else the reason."""
    words = candidate.split()
    if not 3 <= len(words) <= 150:
        return "length"
    lowered = f" {candidate.lower()} "
    if any(f" {w} " in lowered for w in UNSUITABLE):
        return "unsuitable"
    for other in pool:
        if scorer.score(other, candidate)["rougeL"].fmeasure >= threshold:
            return "similar"
    return None


def _task_prompt(demos: list[str]) -> list[dict[str, str]]:
    listed = "\n".join(f"{i}. {d}" for i, d in enumerate(demos, 1))
    return [
        {
            "role": "user",
            "content": f"Here are some tasks:\n{listed}\nWrite one new task, different from "
            "these. Reply with the task only.",
        }
    ]


def self_instruct(
    model_ref: str | Path,
    seeds_path: str | Path,
    out: str | Path,
    n: int = 100,
    demos: int = 3,
    batch: int = 8,
    threshold: float = 0.7,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Grow the seed pool by up to `n` new instructions with their answers; writes them as
    Alpaca JSONL. Returns the counts of what was kept and why the rest was not."""
    if n < 1 or demos < 1 or batch < 1 or not 0 < threshold <= 1 or temperature <= 0:
        raise UsageError(
            "self-instruct: need --n, --demos, --batch >= 1, --threshold in (0, 1] and "
            "--temperature > 0"
        )
    out = claim_output_file(
        out, "self-instruct", lambda p: p.read_text(errors="replace").startswith('{"instruction"'),
        overwrite,
    )  # fmt: skip
    seeds = read_seeds(seeds_path)
    ckpt = resolve_checkpoint(model_ref)
    model, tok = load_model(ckpt).eval(), load_tokenizer(ckpt)
    stops = stop_ids_of(tok, chat=True)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(seed)
    pool, kept = list(seeds), []
    counts = {"generated": 0, "length": 0, "unsuitable": 0, "similar": 0}
    rounds = 0
    while len(kept) < n and rounds < 4 * -(-n // batch) + 2:
        prompts = [
            encode_chat(tok, _task_prompt(rng.sample(pool, min(demos, len(pool)))))
            for _ in range(batch)
        ]
        gen = GenerationConfig(
            temperature=temperature, top_p=0.95, max_new_tokens=max_new_tokens,
            stop_ids=stops, seed=seed * 7919 + rounds,
        )  # fmt: skip
        for c in generate_batch(model, prompts, gen, tokenizer=tok):
            counts["generated"] += 1
            text = (c.text or "").strip().splitlines()[0].strip() if (c.text or "").strip() else ""
            text = text.lstrip("0123456789.) ").strip()
            reason = why_rejected(text, pool, scorer, threshold)
            if reason is not None:
                counts[reason] += 1
                continue
            pool.append(text)
            kept.append(text)
            if len(kept) == n:
                break
        rounds += 1
    if kept:
        answers = generate_batch(
            model,
            [encode_chat(tok, [{"role": "user", "content": k}]) for k in kept],
            GenerationConfig(max_new_tokens=max_new_tokens * 2, stop_ids=stops),
            tokenizer=tok,
        )
        records = [
            json.dumps({"instruction": k, "input": "", "output": (a.text or "").strip()},
                       ensure_ascii=False)
            for k, a in zip(kept, answers, strict=True)
        ]  # fmt: skip
        write_text(out, "\n".join(records) + "\n")
    log(
        f"self-instruct: kept {len(kept)} of {counts['generated']} generated "
        f"(rejected: {counts['similar']} too similar, {counts['length']} too short or long, "
        f"{counts['unsuitable']} unsuitable)"
    )
    return {"kept": len(kept), **counts}
