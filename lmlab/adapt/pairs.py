"""Building preference pairs where none exist: sample k answers per prompt from a model,
score them, and keep the best and the worst as (chosen, rejected) when their scores
differ. The scorer is a verifier (the exact answers of lmlab's generated reasoning
tasks), a reward model (`lmlab align rm`'s output), or an LLM judge (`lmlab.eval.judge`:
each answer's mean probability of beating each other one, judged in both orders against
position bias). The pairs are written in TRL's conventions with their scores, ready for
`lmlab align dpo`.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import torch

from lmlab.adapt.grpo import (
    load_reward_model,
    reward_model_scores,
    rewards_for,
    sample,
    task_turns,
)
from lmlab.console import log
from lmlab.errors import UsageError
from lmlab.eval.judge import compare, model_judge
from lmlab.eval.synthetic import check_task, make_items
from lmlab.infer.options import GenerationConfig
from lmlab.model.loading import load_model, resolve_checkpoint
from lmlab.tokenizer import load_tokenizer
from lmlab.tokenizer.chat import stop_ids_of
from lmlab.utils import claim_output_file, write_text


def _is_pairs_file(path: Path) -> bool:
    """A JSONL file whose first record is a pair this command wrote."""
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and {"prompt", "chosen", "rejected", "scorer"} <= set(first)


def _judge_scores(judge_model, items, texts: list[str], k: int) -> torch.Tensor:
    """Each answer's mean probability of being the better of a pair, over every other
    answer to its item, each pair judged in both orders."""
    path = resolve_checkpoint(judge_model)
    judge = model_judge(load_model(path).eval(), load_tokenizer(path))
    scores = torch.zeros(len(texts))
    for i, item in enumerate(items):
        answers = {str(j): texts[i * k + j] for j in range(k)}
        for a, b in combinations(range(k), 2):
            v = compare(judge, item.question, answers, str(a), str(b))
            scores[i * k + a] += v.p_a / (k - 1)
            scores[i * k + b] += (1 - v.p_a) / (k - 1)
    return scores


def build_pairs(
    model_ref: str | Path,
    out: str | Path,
    task: str,
    n_prompts: int,
    k: int = 4,
    difficulty: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    reward_model: str | Path | None = None,
    judge_model: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Sample `k` answers to each of `n_prompts` items of `task`, score them with the
    task's verifier (or `reward_model`), and write one pair per item whose best and worst
    scores differ. Returns counts."""
    check_task(task, difficulty)
    if k < 2 or n_prompts < 1 or temperature <= 0:
        raise UsageError("pairs: need --k >= 2, --prompts >= 1 and --temperature > 0")
    if reward_model is not None and judge_model is not None:
        raise UsageError("pairs: rank by --reward-model or by --judge, not both")
    out = claim_output_file(out, "preference pairs", _is_pairs_file, overwrite)
    items = make_items(task, n_prompts, difficulty, seed, split="train")
    ckpt = resolve_checkpoint(model_ref)
    model, tok = load_model(ckpt).eval(), load_tokenizer(ckpt)
    judge = load_reward_model(reward_model) if reward_model is not None else None
    gen = GenerationConfig(
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        n=k,
        seed=seed,
        stop_ids=stop_ids_of(tok, chat=True),
    )
    log(f"pairs: {k} answers to each of {len(items)} {task} items")
    _, comps = sample(model, tok, items, gen)
    texts = [c.text or "" for c in comps]
    if judge_model is not None:
        scores = _judge_scores(judge_model, items, texts, k)
        scorer = f"judge:{judge_model}"
    elif judge is None:
        scores = rewards_for(task, texts, [items[c.prompt_index].answer for c in comps], 0.0)
        scorer = f"verifier:{task}"
    else:
        scores = reward_model_scores(judge, [items[c.prompt_index] for c in comps], texts)
        scorer = f"reward_model:{reward_model}"
    lines, ties = [], 0
    for i, item in enumerate(items):
        s = scores[i * k : (i + 1) * k]
        best, worst = int(torch.argmax(s)), int(torch.argmin(s))
        if s[best] == s[worst]:
            ties += 1  # every answer scored alike: no preference to learn
            continue
        rec = {
            "prompt": task_turns(item),
            "chosen": texts[i * k + best],
            "rejected": texts[i * k + worst],
            "score_chosen": float(s[best]),
            "score_rejected": float(s[worst]),
            "scorer": scorer,
            "id": item.id,
        }
        lines.append(json.dumps(rec, ensure_ascii=False))
    if not lines:
        raise UsageError(
            f"pairs: all {len(items)} items had {k} equally scored answers; raise --k or "
            "--temperature, or lower --difficulty"
        )
    write_text(out, "\n".join(lines) + "\n")
    return {"pairs": len(lines), "items": len(items), "ties": ties, "scorer": scorer}
