"""Evaluation tasks in lm-evaluation-harness's YAML shape, run by lmlab itself, offline.

A task file names its data (local JSONL / CSV / Parquet), how a document becomes a prompt
(`doc_to_text`), its answer (`doc_to_target`) and, for multiple choice, its options
(`doc_to_choice`): each a field name, a Jinja template, or a literal, with lm-eval's
rules. `output_type` picks the scoring (Zhao et al. §7.1):

- `multiple_choice`: the log-likelihood of each option after the prompt; `acc`,
  `acc_norm` (log-likelihood per character, as lm-eval) and `acc_mutual_info`
  (log p(option | prompt) - log p(option): calibrated scoring).
- `loglikelihood_rolling`: a whole document scored in disjoint windows of maximal
  context; `word_perplexity`, `byte_perplexity`, `bits_per_byte`.
- `generate_until`: greedy generation up to the stop strings, `filter_list` answer
  extraction (regex, take_first, lowercase, strip), then `exact_match`. lmlab's
  extension `strategy: NAME` (`lmlab.prompt.strategies`: direct, zero_shot_cot,
  few_shot_cot, self_consistency, least_to_most, plan_and_solve, self_refine, pal)
  answers each document's `doc_to_text` with that strategy instead, reads the answer in
  `answer_form` (integer, yes_no, word, comma_list, word_list) from the output and from
  the target alike, and scores it with the task's metrics; `strategy_kwargs` go to the
  strategy (e.g. `n` for self-consistency), and few-shot CoT takes its worked
  demonstrations from the fewshot split (`num_fewshot` of them, chosen as above).

Tokenization follows lm-eval's HFLM (trailing spaces of a context move to the
continuation; context and continuation are encoded together and split), so the same task
scores the same numbers through `lm_eval --model lmlab` and here.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lmlab.errors import UsageError
from lmlab.eval.stats import summarize
from lmlab.prompt.answers import INVALID, extract_regex
from lmlab.prompt.demos import SELECTORS, order_demos, select_demos
from lmlab.prompt.fewshot import fewshot_context
from lmlab.prompt.likelihood import loglikelihoods, prefix_token, score_continuations
from lmlab.prompt.templates import render_jinja

OUTPUT_TYPES = ("multiple_choice", "loglikelihood_rolling", "generate_until")
METRICS = {
    "multiple_choice": ("acc", "acc_norm", "acc_mutual_info"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "generate_until": ("exact_match", "f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL"),
}


@dataclass
class Task:
    name: str
    output_type: str
    data_files: dict[str, str]
    test_split: str
    doc_to_text: Any = None
    doc_to_target: Any = None
    doc_to_choice: Any = None
    fewshot_split: str | None = None
    num_fewshot: int = 0
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    generation_kwargs: dict = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)
    metric_kwargs: dict[str, dict] = field(default_factory=dict)
    filters: list[dict] = field(default_factory=list)
    source: Path | None = None
    kind: str = "json"  # dataset_path: json, csv or parquet
    # lmlab's extension: how demonstrations are chosen for each document (random, bm25,
    # knn: KATE's nearest neighbours, mmr) and ordered (random; similarity: the most
    # similar next to the question)
    fewshot_selector: str = "random"
    fewshot_order: str = "random"
    # lmlab's extension: generate_until answered by a reasoning strategy
    strategy: str | None = None
    answer_form: str = "integer"
    strategy_kwargs: dict = field(default_factory=dict)


# --- loading --------------------------------------------------------------------------------


def load_task(path: str | Path) -> Task:
    """Read one task YAML; data files are resolved relative to the YAML's directory."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"{path}: cannot read task ({e})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a task file is a mapping")
    name = raw.get("task") or path.stem
    out = raw.get("output_type", "generate_until")
    if out not in OUTPUT_TYPES:
        raise UsageError(f"{path}: output_type {out!r} (lmlab runs: {', '.join(OUTPUT_TYPES)})")
    if raw.get("dataset_path") not in ("json", "csv", "parquet"):
        raise UsageError(f"{path}: dataset_path must be json, csv or parquet (local files)")
    files = (raw.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, str):
        files = {"train": files}
    if not isinstance(files, dict) or not files:
        raise UsageError(f"{path}: dataset_kwargs.data_files must name the local data files")
    files = {k: str(_data_path(path, v)) for k, v in files.items()}
    test_split = raw.get("test_split") or raw.get("validation_split")
    if test_split not in files:
        raise UsageError(f"{path}: test_split {test_split!r} is not in data_files {list(files)}")
    entries = [m if isinstance(m, dict) else {"metric": m} for m in raw.get("metric_list", [])]
    metrics = [m["metric"] for m in entries]
    skip = ("metric", "aggregation", "higher_is_better")
    metric_kwargs = {m["metric"]: {k: v for k, v in m.items() if k not in skip} for m in entries}
    metrics = metrics or list(METRICS[out][:2] if out != "loglikelihood_rolling" else METRICS[out])
    if out == "generate_until" and not entries:
        metrics = ["exact_match"]
    unknown = [m for m in metrics if m not in METRICS[out]]
    if unknown:
        raise UsageError(f"{path}: metric {unknown[0]!r} (for {out}: {', '.join(METRICS[out])})")
    task = Task(
        name=name,
        output_type=out,
        data_files=files,
        test_split=test_split,
        doc_to_text=raw.get("doc_to_text"),
        doc_to_target=raw.get("doc_to_target"),
        doc_to_choice=raw.get("doc_to_choice"),
        fewshot_split=raw.get("fewshot_split") or raw.get("training_split"),
        num_fewshot=int(raw.get("num_fewshot", 0)),
        target_delimiter=raw.get("target_delimiter", " "),
        fewshot_delimiter=raw.get("fewshot_delimiter", "\n\n"),
        description=raw.get("description", ""),
        generation_kwargs=raw.get("generation_kwargs") or {},
        metrics=metrics,
        metric_kwargs=metric_kwargs,
        filters=(raw.get("filter_list") or [{}])[0].get("filter", []),
        source=path,
        kind=raw["dataset_path"],
        fewshot_selector=_choice(path, raw, "fewshot_selector", SELECTORS),
        fewshot_order=_choice(path, raw, "fewshot_order", ("random", "similarity")),
    )
    if task.fewshot_order == "similarity" and task.fewshot_selector == "random":
        raise UsageError(f"{path}: fewshot_order similarity needs a fewshot_selector by similarity")
    _strategy_keys(path, raw, task)
    return task


# what run_task gives every strategy itself (few-shot CoT's shots come from the task)
FIXED_ARGS = {"backend", "question", "form", "cfg", "shots"}


def _strategy_keys(path: Path, raw: dict, task: Task) -> None:
    """Check and set `strategy`, `answer_form` and `strategy_kwargs`."""
    from lmlab.prompt import strategies
    from lmlab.prompt.answers import FORMS
    from lmlab.prompt.strategies import STRATEGIES

    if "strategy" not in raw:
        for key in ("answer_form", "strategy_kwargs"):
            if key in raw:
                raise UsageError(f"{path}: {key} needs a strategy")
        return
    name = raw["strategy"]
    if name not in STRATEGIES:
        raise UsageError(f"{path}: strategy {name!r} (choose one of {', '.join(STRATEGIES)})")
    if task.output_type != "generate_until":
        raise UsageError(f"{path}: a strategy answers generate_until tasks, not {task.output_type}")
    form = raw.get("answer_form", "integer")
    if form not in FORMS:
        raise UsageError(f"{path}: answer_form {form!r} (choose one of {', '.join(FORMS)})")
    kwargs = raw.get("strategy_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise UsageError(f"{path}: strategy_kwargs must be a mapping")
    takes = set(inspect.signature(getattr(strategies, name)).parameters) - FIXED_ARGS
    if set(kwargs) - takes:
        bad = sorted(set(kwargs) - takes)[0]
        raise UsageError(f"{path}: strategy_kwargs: {name} takes no {bad!r} ({sorted(takes)})")
    if name == "few_shot_cot" and task.num_fewshot < 1:
        raise UsageError(f"{path}: few_shot_cot needs num_fewshot >= 1 and a fewshot_split")
    task.strategy, task.answer_form, task.strategy_kwargs = name, form, dict(kwargs)


def _choice(path: Path, raw: dict, key: str, allowed: tuple[str, ...]) -> str:
    value = raw.get(key, "random")
    if value not in allowed:
        raise UsageError(f"{path}: {key} {value!r} (choose one of {', '.join(allowed)})")
    return value


def _data_path(task_file: Path, name: str) -> Path:
    """A data file relative to the task YAML, else to the current directory (where
    lm-eval's `datasets` looks), so one task file serves both tools."""
    p = Path(name)
    if p.is_absolute():
        return p
    beside = task_file.parent / p
    return beside if beside.is_file() or not p.is_file() else p


def read_docs(path: str | Path, kind: str) -> list[dict]:
    """Rows of a local JSONL / CSV / Parquet file, as dicts."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such data file")
    try:
        if kind == "json":
            df = pd.read_json(p, lines=p.suffix in (".jsonl", ".ndjson") or None)
        elif kind == "csv":
            df = pd.read_csv(p)
        else:
            df = pd.read_parquet(p)
    except ValueError as e:
        raise UsageError(f"{p}: cannot read as {kind} ({e})") from None
    return [{k: _plain(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


# --- lm-eval's document rules ---------------------------------------------------------------


def doc_value(spec: Any, doc: dict, has_choices: bool, kind: str) -> Any:
    """A field name, a Jinja template (digits become an index when there are choices;
    `[...]` a list for targets), or a literal, as lm-eval resolves them."""
    if isinstance(spec, (int, list)):
        return spec
    if not isinstance(spec, str):
        raise UsageError(f"doc_to_{kind}: expected a field, a template or a literal")
    if spec in doc:
        return doc[spec]
    text = render_jinja(spec, doc)
    if kind == "choice":
        return ast.literal_eval(text)
    if text.isdigit() and has_choices:
        return int(text)
    if kind == "target" and len(text) >= 2 and text[0] == "[" and text[-1] == "]":
        try:
            return ast.literal_eval(text)
        except (SyntaxError, ValueError):
            return text
    return text


def choices_of(task: Task, doc: dict) -> list[str]:
    return [str(c) for c in doc_value(task.doc_to_choice, doc, True, "choice")]


def target_text(task: Task, doc: dict) -> str:
    """The answer as text (an index resolved through the choices)."""
    t = doc_value(task.doc_to_target, doc, task.doc_to_choice is not None, "target")
    if isinstance(t, list):
        t = t[0]
    if isinstance(t, int) and task.doc_to_choice is not None:
        return choices_of(task, doc)[t]
    return str(t)


def gold_index(task: Task, doc: dict) -> int:
    t = doc_value(task.doc_to_target, doc, True, "target")
    if isinstance(t, int):
        return t
    return choices_of(task, doc).index(str(t))


def context_of(task: Task, doc: dict, shots: list[dict]) -> str:
    """Description, then the demonstrations with their answers, then the prompt."""
    has_choices = task.doc_to_choice is not None
    demos = [
        (doc_value(task.doc_to_text, s, has_choices, "text"), target_text(task, s)) for s in shots
    ]
    text = doc_value(task.doc_to_text, doc, has_choices, "text")
    return fewshot_context(
        str(text), demos, task.description, task.target_delimiter, task.fewshot_delimiter
    )


# --- log-likelihoods -------------------------------------------------------------------------


def rolling_loglikelihood(model, tok, text: str, batch_size: int = 8) -> float:
    """A whole document's log-likelihood: disjoint windows, each predicted with the
    longest context that fits (lm-eval's rolling windows), the first after the prefix."""
    max_len = model.cfg.max_seq_len
    tokens = tok.encode(text).ids
    seq = [prefix_token(tok)] + tokens  # seq[j] predicts tokens[j] = seq[j + 1]
    windows = []
    for done in range(0, len(tokens), max_len):
        end = min(done + max_len, len(tokens))
        start = max(0, end - max_len)  # the input is seq[start:end]
        windows.append((seq[start : done + 1], seq[done + 1 : end + 1]))
    return sum(ll for ll, _ in score_continuations(model, windows, batch_size))


# --- filters and the runner -------------------------------------------------------------------


def apply_filters(text: str, steps: list[dict]) -> str:
    """lm-eval's answer extraction steps, in order: regex (a capture group, the first
    match by default, `[invalid]` when nothing matches), take_first, lowercase,
    uppercase, remove_whitespace / strip."""
    for step in steps:
        fn = step.get("function")
        if fn == "regex":
            pattern = step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)")
            group = step.get("group_select", 0)
            text = extract_regex(text, pattern, group, step.get("fallback", INVALID)).strip()
        elif fn == "take_first":
            continue  # one generation per request here: already the first
        elif fn == "lowercase":
            text = text.lower()
        elif fn == "uppercase":
            text = text.upper()
        elif fn in ("remove_whitespace", "strip"):
            text = text.lstrip() if fn == "remove_whitespace" else text.strip()
        else:
            raise UsageError(
                f"filter function {fn!r} (lmlab runs: regex, take_first, "
                "lowercase, uppercase, remove_whitespace, strip)"
            )
    return text


def exact_match(
    pred: str,
    gold: str,
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    regexes_to_ignore: list[str] | None = None,
) -> float:
    """HF evaluate's exact_match, the metric lm-eval tasks name."""
    import string

    for rx in regexes_to_ignore or []:
        pred, gold = re.sub(rx, "", pred), re.sub(rx, "", gold)
    if ignore_case:
        pred, gold = pred.lower(), gold.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        pred, gold = pred.translate(table), gold.translate(table)
    return float(pred == gold)


def fewshot_docs(task: Task, rng: np.random.Generator, exclude: dict | None) -> list[dict]:
    if task.num_fewshot == 0:
        return []
    if task.fewshot_split is None or task.fewshot_split not in task.data_files:
        raise UsageError(f"{task.name}: num_fewshot > 0 needs a fewshot_split in data_files")
    pool = [d for d in read_docs(task.data_files[task.fewshot_split], task.kind) if d != exclude]
    if len(pool) < task.num_fewshot:
        raise UsageError(f"{task.name}: {task.num_fewshot} shots but {len(pool)} fewshot docs")
    if task.fewshot_selector == "random" and task.fewshot_order == "random":
        return [pool[i] for i in rng.choice(len(pool), task.num_fewshot, replace=False)]
    has_choices = task.doc_to_choice is not None
    texts = [str(doc_value(task.doc_to_text, d, has_choices, "text")) for d in pool]
    query = str(doc_value(task.doc_to_text, exclude, has_choices, "text")) if exclude else ""
    seed = int(rng.integers(1 << 31))
    picked = select_demos(query, texts, task.num_fewshot, task.fewshot_selector, seed)
    if task.fewshot_order == "similarity":  # best first from the selector: reversed
        picked = picked[::-1]
    else:
        picked = order_demos(picked, "random", seed)
    return [pool[i] for i in picked]


def run_task(
    model,
    tok,
    task: Task,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    chat: bool = False,
) -> dict:
    """Score a task: {metric: {value, stderr}} plus one record per document. With `chat`,
    each prompt becomes a user turn and the answer is scored or generated as the
    assistant's (an instruction-tuned model's format, as lm-eval's apply_chat_template)."""
    from lmlab.tokenizer.chat import apply_chat_template

    def prompt_of(doc: dict) -> str:
        ctx = context_of(task, doc, fewshot_docs(task, rng, doc))
        return apply_chat_template(tok, [{"role": "user", "content": ctx}]) if chat else ctx

    docs = read_docs(task.data_files[task.test_split], task.kind)[:limit]
    rng = np.random.default_rng(seed)
    records: list[dict] = []
    if task.output_type == "multiple_choice":
        for doc in docs:
            ctx = prompt_of(doc)
            choices = choices_of(task, doc)
            reqs = [(ctx, task.target_delimiter + c) for c in choices]
            if "acc_mutual_info" in task.metrics:
                reqs += [("", task.target_delimiter + c) for c in choices]
            lls = np.array([ll for ll, _ in loglikelihoods(model, tok, reqs, batch_size)])
            cond = lls[: len(choices)]
            gold = gold_index(task, doc)
            rec = {
                "context": ctx,
                "choices": choices,
                "gold": gold,
                "loglikelihoods": cond.tolist(),
            }
            scores = {
                "acc": float(np.argmax(cond) == gold),
                "acc_norm": float(np.argmax(cond / np.array([len(c) for c in choices])) == gold),
            }
            if "acc_mutual_info" in task.metrics:
                scores["acc_mutual_info"] = float(np.argmax(cond - lls[len(choices) :]) == gold)
            probs = np.exp(cond - cond.max())
            rec["confidence"] = float(probs.max() / probs.sum())  # for calibration
            rec.update({m: scores[m] for m in task.metrics})
            records.append(rec)
        results = {m: _mean(records, m) for m in task.metrics}
    elif task.output_type == "loglikelihood_rolling":
        for doc in docs:
            text = str(doc_value(task.doc_to_text, doc, False, "text"))
            ll = rolling_loglikelihood(model, tok, text)
            words, nbytes = len(re.split(r"\s+", text)), len(text.encode("utf-8"))
            records.append({"loglikelihood": ll, "words": words, "bytes": nbytes})
        results = {}
        for m in task.metrics:  # weighted over the corpus, as lm-eval aggregates them
            results[m] = rolling_metric(records, m, seed)
    elif task.strategy is not None:
        records = [_strategy_record(model, tok, task, doc, rng, seed) for doc in docs]
        results = _generation_results(records, task, seed)
    else:
        from lmlab.infer import GenerationConfig, generate_batch

        kw = task.generation_kwargs
        until = kw.get("until", [task.fewshot_delimiter])
        until = [until] if isinstance(until, str) else list(until)
        cfg = GenerationConfig(
            max_new_tokens=int(kw.get("max_gen_toks", 256)),
            temperature=float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0,
            stop_strings=until,
            seed=seed,
        )
        prompts = [prompt_of(d) for d in docs]
        comps = generate_batch(model, [tok.encode(p).ids for p in prompts], cfg, tokenizer=tok)
        for doc, prompt, c in zip(docs, prompts, comps, strict=True):
            pred = apply_filters(c.text or "", task.filters)
            gold = target_text(task, doc)
            rec = {"prompt": prompt, "generation": c.text, "filtered": pred, "target": gold}
            rec.update(generation_scores(pred, gold, task))
            records.append(rec)
        results = _generation_results(records, task, seed)
    return {"task": task.name, "n": len(docs), "results": results, "records": records}


def _generation_results(records: list[dict], task: Task, seed: int) -> dict:
    results = {}
    for m in task.metrics:
        if m in ("bleu", "chrf"):  # corpus statistics: bootstrap over items
            results[m] = corpus_score(records, m, seed)
        else:
            results[m] = _mean(records, m)
    return results


def _strategy_record(model, tok, task: Task, doc: dict, rng, seed: int) -> dict:
    """One document answered by the task's strategy through the local backend. The
    target is read in the same answer form as the output, so "1,234" and "1234" match
    and a worked target's "The answer is X." counts as X."""
    from lmlab.infer import GenerationConfig
    from lmlab.prompt.answers import read_answer
    from lmlab.prompt.backend import LocalBackend
    from lmlab.prompt.strategies import solve

    kw = task.generation_kwargs
    cfg = GenerationConfig(
        max_new_tokens=int(kw.get("max_gen_toks", 256)),
        temperature=float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0,
        seed=seed,
    )
    question = str(doc_value(task.doc_to_text, doc, False, "text"))
    if task.description:
        question = f"{task.description}{question}"
    extra = dict(task.strategy_kwargs)
    if task.strategy == "few_shot_cot":
        shots = fewshot_docs(task, rng, doc)
        extra["shots"] = [
            (str(doc_value(task.doc_to_text, s, False, "text")), target_text(task, s))
            for s in shots
        ]
    sol = solve(task.strategy, LocalBackend(model, tok), question, task.answer_form, cfg, **extra)
    target = target_text(task, doc)
    gold = read_answer(target, task.answer_form) or target.strip()
    pred = sol.answer or ""
    rec = {
        "prompt": question,
        # the model's last words (PAL's last entry is the program's run, not a reply)
        "generation": next((t["output"] for t in reversed(sol.transcript) if "output" in t), ""),
        "filtered": pred,
        "target": gold,
        "transcript": sol.transcript,
    }
    if sol.votes is not None:
        rec["votes"] = sol.votes
    rec.update(generation_scores(pred, gold, task))
    return rec


def _rolling_value(recs, metric: str) -> float:
    ll = sum(r["loglikelihood"] for r in recs)
    if metric == "word_perplexity":
        return math.exp(-ll / sum(r["words"] for r in recs))
    if metric == "byte_perplexity":
        return math.exp(-ll / sum(r["bytes"] for r in recs))
    return -ll / sum(r["bytes"] for r in recs) / math.log(2)


def rolling_metric(records: list[dict], metric: str, seed: int) -> dict:
    """A corpus-weighted perplexity, with a bootstrap standard error over documents (there
    is no closed form for a ratio of sums)."""
    from lmlab.eval.stats import bootstrap

    value = _rolling_value(records, metric)
    if len(records) < 2:
        return {"value": value, "stderr": None}
    b = bootstrap(records, lambda s: _rolling_value(s, metric), n_boot=200, seed=seed)
    return {
        "value": value,
        "stderr": b.stderr,
        "ci95": list(b.ci),
        "n": len(records),
        "method": "bootstrap",
    }


def generation_scores(pred: str, gold: str, task: Task) -> dict[str, float]:
    """Per-item scores of one generation (BLEU/chrF per item too, for paired tests)."""
    from lmlab.eval import metrics as M

    out: dict[str, float] = {}
    for m in task.metrics:
        if m == "exact_match":
            out[m] = exact_match(pred, gold, **task.metric_kwargs.get(m, {}))
        elif m == "f1":
            out[m] = M.token_f1(pred, gold)
        elif m == "bleu":
            out[m] = M.sentence_bleu(pred, gold)
        elif m == "chrf":
            out[m] = M.sentence_chrf(pred, gold)
        else:
            out[m] = M.rouge(pred, gold)[m]
    return out


def corpus_score(records: list[dict], metric: str, seed: int) -> dict:
    """Corpus BLEU / chrF (sacrebleu) with a bootstrap standard error over items."""
    from lmlab.eval import metrics as M
    from lmlab.eval.stats import bootstrap

    fn = M.corpus_bleu if metric == "bleu" else M.corpus_chrf
    pairs = [(r["filtered"], r["target"]) for r in records]

    def score(sample):
        return fn([p for p, _ in sample], [g for _, g in sample])

    b = bootstrap(pairs, score, n_boot=200, seed=seed)
    return {
        "value": b.value,
        "stderr": b.stderr,
        "ci95": list(b.ci),
        "n": b.n,
        "method": "bootstrap",
    }


def _mean(records: list[dict], key: str) -> dict:
    """Accuracy-like 0/1 scores get a binomial error and a Wilson interval."""
    values = [float(r[key]) for r in records]
    binary = all(v in (0.0, 1.0) for v in values)
    return summarize(values, "proportion" if binary else "mean")
