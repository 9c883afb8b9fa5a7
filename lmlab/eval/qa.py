"""Held-out question answering: the base model prompted with few-shot examples versus the
instruction-tuned model prompted through the chat template (Zhao et al. §6.1, §7.1.2)."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from lmlab.console import progress
from lmlab.eval.metrics import clean_generation, exact_match, mean_stderr, rouge_l
from lmlab.infer.generate import stream
from lmlab.infer.options import GenerationConfig
from lmlab.prompt.fewshot import few_shot_prompt
from lmlab.tokenizer.chat import apply_chat_template, stop_ids_of


def answer(
    model, tok: Tokenizer, prompt: str, max_new_tokens: int, stop: list[int], first_line: bool
) -> str:
    """Greedy answer. With `first_line`, generation ends at the first newline that follows
    some text, and the answer is that first non-empty line (a base model often opens
    with a line break before it answers)."""
    ids: list[int] = []
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, stop_ids=stop)
    for t in stream(model, tok.encode(prompt).ids, cfg):
        ids.append(t)
        if first_line and "\n" in tok.decode(ids, skip_special_tokens=True).lstrip():
            break
    text = tok.decode(ids, skip_special_tokens=True).strip()
    return clean_generation(text.split("\n")[0])


def evaluate_qa(
    model,
    tok: Tokenizer,
    items: list[dict],
    mode: str,
    shots: list[dict],
    max_new_tokens: int,
    label: str,
) -> dict:
    """mode "few-shot" (base) or "chat" (SFT); returns metrics with standard errors and items."""
    stop = stop_ids_of(tok, chat=True)  # the base model's few-shot answers end there too
    rows = []
    with progress(f"qa {label}", total=len(items)) as bar:
        for item in items:
            if mode == "chat":
                prompt = apply_chat_template(tok, [{"role": "user", "content": item["question"]}])
            else:
                prompt = few_shot_prompt(item["question"], shots)
            pred = answer(model, tok, prompt, max_new_tokens, stop, first_line=mode != "chat")
            rows.append(
                {
                    "name": item["name"],
                    "question": item["question"],
                    "reference": item["answer"],
                    "prediction": pred,
                    "exact_match": exact_match(pred, item["answer"]),
                    "rouge_l": rouge_l(pred, item["answer"]),
                }
            )
            bar.update(advance=1)
    em = mean_stderr([r["exact_match"] for r in rows])
    rl = mean_stderr([r["rouge_l"] for r in rows])
    return {
        "mode": mode,
        "n": len(rows),
        "exact_match": em[0],
        "exact_match_se": em[1],
        "rouge_l": rl[0],
        "rouge_l_se": rl[1],
        "items": rows,
    }


def pick_items(rows: list[dict], n: int, seed: int) -> list[dict]:
    if len(rows) <= n:
        return rows
    idx = np.random.default_rng(seed).choice(len(rows), size=n, replace=False)
    return [rows[i] for i in sorted(idx)]
