"""Code synthesis scored by execution: pass@k (Chen et al. 2021, Zhao et al. §7.1.1).

A task is a HumanEval-shaped record: `prompt` (a function signature and docstring),
`canonical_solution` (its body), `test` (asserts that call `entry_point`). The model
continues the prompt; the completion is cut where the function ends (HumanEval's stop
sequences: a new top-level `def`, `class`, `if`, `print` or comment); prompt + completion
then runs against the tests in `lmlab.prompt.sandbox`. With n samples per task of which c
pass, pass@k is the unbiased estimate 1 - C(n-c, k) / C(n, k) of the chance that at least
one of k samples passes, averaged over tasks with its standard error.

    tasks = load_tasks()                     # the built-in set, or load_tasks("my.jsonl")
    res = evaluate_code(model, tok, tasks, n=5, k=(1, 5))
    res["pass@1"], res["pass@1_se"], res["tasks"][0]["samples"][0]["status"]
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import UsageError
from lmlab.eval.metrics import mean_stderr, pass_at_k
from lmlab.prompt.sandbox import resolve_isolation, run_many
from lmlab.utils import jsonl_objects

BUILTIN_TASKS = Path(__file__).parent / "data" / "code_tasks.jsonl"
# HumanEval's stop sequences (Chen et al. 2021), plus the end of a Markdown code fence
STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```"]
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


@dataclass
class CodeTask:
    task_id: str
    prompt: str  # signature + docstring, ending with a newline
    canonical_solution: str  # the reference body, to check the tests themselves
    test: str  # asserts calling entry_point; run after prompt + completion
    entry_point: str


def load_tasks(path: str | Path | None = None) -> list[CodeTask]:
    """The built-in task set, or a JSONL file with one object per line carrying the
    string fields task_id, prompt, canonical_solution, test, entry_point."""
    path = Path(path) if path is not None else BUILTIN_TASKS
    if not path.is_file():
        raise UsageError(f"code tasks: no such file {path}")
    tasks, seen = [], set()
    for where, row in jsonl_objects(path, f"each line must be a JSON object with {FIELDS}"):
        for key in FIELDS:
            if not isinstance(row.get(key), str) or not row[key]:
                raise UsageError(f"{where}: '{key}' must be a non-empty string")
        if row["task_id"] in seen:
            raise UsageError(f"{where}: duplicate task_id '{row['task_id']}'")
        seen.add(row["task_id"])
        task = CodeTask(**{k: row[k] for k in FIELDS})
        if not task.prompt.endswith("\n"):
            task.prompt += "\n"  # the body starts on its own line
        tasks.append(task)
    if not tasks:
        raise UsageError(f"code tasks: {path} holds no tasks")
    return tasks


def build_prompt(task: CodeTask) -> str:
    """What the model continues: the signature and docstring, as HumanEval does."""
    return task.prompt


def extract_completion(text: str) -> str:
    """The function body from generated text: everything before the first stop sequence
    (a new top-level statement), trailing whitespace dropped."""
    cut = min((i for s in STOP_SEQUENCES if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut].rstrip()


def program(task: CodeTask, completion: str) -> str:
    """The code the sandbox runs before the task's tests."""
    return task.prompt + extract_completion(completion) + "\n"


def _check_k(n: int, k: Sequence[int]) -> list[int]:
    ks = sorted(set(k))
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise UsageError(f"code eval: every k must be in 1..n (n = {n}); got k = {list(k)}")
    return ks


def score_completions(
    tasks: Sequence[CodeTask],
    completions: Sequence[Sequence[str]],
    k: Sequence[int] = (1,),
    timeout_s: float = 5,
    memory_mb: int = 512,
    workers: int = 2,
    isolation: str | None = None,
) -> dict:
    """Run every task's completions (raw generated text, n per task) against its tests,
    each in a sandbox (`isolation`: see `lmlab.prompt.sandbox.resolve_isolation`).

    Returns pass@k per task and averaged over tasks (with standard errors), the status
    counts, and every sample's completion, status and stderr tail."""
    if len(completions) != len(tasks):
        raise UsageError(f"code eval: {len(completions)} completion lists for {len(tasks)} tasks")
    counts = {len(c) for c in completions}
    if len(counts) != 1:
        raise UsageError("code eval: every task needs the same number of completions")
    n = counts.pop()
    ks = _check_k(n, k)
    jobs = [(program(t, c), t.test) for t, cs in zip(tasks, completions, strict=True) for c in cs]
    results = run_many(
        jobs, workers=workers, timeout_s=timeout_s, memory_mb=memory_mb, isolation=isolation
    )
    rows = []
    for ti, task in enumerate(tasks):
        res = results[ti * n : (ti + 1) * n]
        c = sum(r.passed for r in res)
        row = {"task_id": task.task_id, "n": n, "correct": c}
        row.update({f"pass@{kk}": pass_at_k(n, c, kk) for kk in ks})
        row["samples"] = [
            {
                "completion": extract_completion(text),
                "status": r.status,
                "seconds": round(r.seconds, 3),
                "stderr_tail": r.stderr_tail[-500:],
            }
            for text, r in zip(completions[ti], res, strict=True)
        ]
        rows.append(row)
    out: dict = {"num_tasks": len(tasks), "n": n, "k": ks}
    for kk in ks:
        mean, se = mean_stderr([r[f"pass@{kk}"] for r in rows])
        out[f"pass@{kk}"], out[f"pass@{kk}_se"] = mean, se
    out["statuses"] = dict(Counter(r.status for r in results))
    out["tasks"] = rows
    return out


def sample_completions(
    model,
    tokenizer,
    tasks: Sequence[CodeTask],
    n: int = 5,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    max_new_tokens: int = 128,
) -> list[list[str]]:
    """n generated continuations per task, stopped at HumanEval's stop sequences. Each
    task is seeded from `seed` and its task_id, so its samples do not depend on which
    other tasks are in the set."""
    from lmlab.infer import GenerationConfig, generate_batch
    from lmlab.tokenizer import EOS

    eos = tokenizer.token_to_id(EOS)
    out = []
    for task in tasks:
        cfg = GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            n=n,
            seed=seed + zlib.crc32(task.task_id.encode()),
            stop_ids=[eos] if eos is not None else [],
            stop_strings=list(STOP_SEQUENCES),
        ).validate()
        ids = tokenizer.encode(build_prompt(task)).ids
        comps = generate_batch(model, [ids], cfg, tokenizer=tokenizer)
        out.append([c.text or "" for c in comps])
    return out


def evaluate_code(
    model,
    tokenizer,
    tasks: Sequence[CodeTask],
    n: int = 5,
    k: Sequence[int] = (1, 5),
    temperature: float = 0.8,
    seed: int = 0,
    max_new_tokens: int = 128,
    top_p: float = 0.95,
    timeout_s: float = 5,
    memory_mb: int = 512,
    workers: int = 2,
    isolation: str | None = None,
) -> dict:
    """Sample n completions per task with `lmlab.infer.generate_batch` and score pass@k;
    the result carries the resolved settings under "config". Without a sandbox to run the
    samples in, it refuses (UsageError) before any sampling."""
    _check_k(n, k)
    isolation = resolve_isolation(isolation)
    completions = sample_completions(
        model, tokenizer, tasks, n, temperature, top_p, seed, max_new_tokens
    )
    res = score_completions(tasks, completions, k, timeout_s, memory_mb, workers, isolation)
    res["config"] = {
        "n": n,
        "k": list(k),
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "timeout_s": timeout_s,
        "memory_mb": memory_mb,
        "isolation": isolation,
        "stop_sequences": STOP_SEQUENCES,
        "task_ids": [t.task_id for t in tasks],
    }
    return res
