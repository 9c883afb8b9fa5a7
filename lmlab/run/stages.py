"""The stages of the default pipeline, each reading the files of the stages before it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tokenizers import Tokenizer

from lmlab.adapt.docstring_qa import build_pairs
from lmlab.adapt.instruct import instruct, parse_source
from lmlab.adapt.sft import sft
from lmlab.console import log
from lmlab.data.mixture import write_token_shards
from lmlab.data.pipeline import prepare
from lmlab.data.shards import open_split
from lmlab.errors import UsageError
from lmlab.model.checkpoint import save_checkpoint
from lmlab.model.config import ModelConfig
from lmlab.model.loading import load_model
from lmlab.model.precision import resolve_precision
from lmlab.run.rundir import Run
from lmlab.tokenizer import iter_texts, load_tokenizer, save_model_tokenizer, save_tokenizer
from lmlab.tokenizer.train import train_tokenizer
from lmlab.train import distributed as dist_
from lmlab.train.pretrain import pretrain
from lmlab.utils import hash_obj, write_json, write_jsonl


def stage_data(run: Run) -> dict:
    stats = prepare(run.recipe.data, run.stage_dir("data"), check_out=False)
    if stats["kept"]["train"]["documents"] == 0:
        raise UsageError("data: no document survived the filters (see data/stats.json)")
    if stats["kept"]["val"]["documents"] == 0:
        raise UsageError("data: the validation split is empty; raise data.val_fraction or add data")
    removed = {f"{s['name']}:{k}": v for s in stats["steps"] for k, v in s["dropped"].items()}
    return {"kept": stats["kept"], "removed_by_rule": removed, "pii": stats["pii"]}


def stage_tokenizer(run: Run) -> dict:
    cfg = run.recipe.tokenizer
    docs = run.stage_dir("data") / "documents"
    out = run.stage_dir("tokenizer")
    base = run.recipe.base_model
    if base is not None:  # the base model's own, with its chat template and stop ids
        log(f"tokenizer: {base}'s own")
        tok = load_tokenizer(base)
        save_model_tokenizer(tok, out)
        kind = f"{base}'s"
    else:
        log(f"tokenizer: training byte-level {cfg.kind}, vocabulary {cfg.vocab_size}")
        texts = iter_texts(docs / "train.jsonl")
        tok = train_tokenizer(cfg.kind, texts, cfg.vocab_size, cfg.min_frequency)
        save_tokenizer(tok, out)
        kind = cfg.kind
    splits = write_token_shards(docs, tok, out / "tokens", run.recipe.data)
    return {
        "kind": kind,
        "vocab_size": tok.get_vocab_size(),
        "tokens": {s: v["tokens"] for s, v in splits.items()},
        "bytes_per_token": round(splits["train"]["bytes"] / max(splits["train"]["tokens"], 1), 3),
    }


def _model_config(run: Run) -> ModelConfig:
    tok = Tokenizer.from_file(str(run.stage_dir("tokenizer") / "tokenizer.json"))
    cfg = run.recipe.model.to_dict()
    cfg["vocab_size"] = tok.get_vocab_size()
    return ModelConfig.from_dict(cfg)


def copy_base_model(run: Run) -> dict:
    """Pre-training skipped: the base model, saved as the stage's model (an lmlab checkpoint
    in float32, whatever form it came in) with the tokenizer stage's files beside it."""
    base = run.recipe.base_model
    model = load_model(base)
    cfg = model.cfg
    seq = max(run.recipe.sft.train.seq_len, run.recipe.pretrain.seq_len)
    if seq > cfg.max_seq_len:
        raise UsageError(
            f"base_model {base}: its context is {cfg.max_seq_len} tokens; lower "
            f"sft.train.seq_len and pretrain.seq_len (now {seq}) to fit"
        )
    out = run.stage_dir("pretrain") / "model"
    if dist_.current().main:  # under torchrun one rank writes it, the others wait for it
        log(f"pretrain: skipped; {base} ({cfg.num_params():,} parameters) is the base model")
        save_checkpoint(
            model.float(), out, tokenizer_dir=run.stage_dir("tokenizer"), extra={"base_model": base}
        )
    dist_.barrier()
    return {
        "base_model": base,
        "parameters": cfg.num_params(),
        "architecture": {k: getattr(cfg, k) for k in ("n_layers", "d_model", "n_heads")},
    }


def stage_pretrain(run: Run) -> dict:
    if run.recipe.base_model is not None:
        return copy_base_model(run)
    mcfg = _model_config(run)
    cfg = run.recipe.pretrain
    say = log if dist_.current().main else (lambda *_: None)
    say(
        f"pretrain: {mcfg.num_params():,} parameters, {mcfg.n_layers} layers × {mcfg.d_model}"
        f"{f' ({mcfg.preset})' if mcfg.preset else ''}, "
        f"precision {resolve_precision(cfg.precision)}"
    )
    key = hash_obj(
        {
            "model": mcfg.to_dict(),
            "train": run.recipe.resolved()["pretrain"],
            "seed": run.recipe.seed,
        }
    )
    summary = pretrain(
        mcfg,
        cfg,
        shard_dir=run.stage_dir("tokenizer") / "tokens",
        tokenizer_dir=run.stage_dir("tokenizer"),
        out_dir=run.stage_dir("pretrain"),
        seed=run.recipe.seed,
        key=key,
    )
    summary["parameters"] = mcfg.num_params()
    return {k: v for k, v in summary.items() if k != "config"}


def sft_model_dir(run: Run) -> Path:
    """The SFT stage's model: tuned on the recipe's instruction sets, or on mined pairs."""
    sdir = run.stage_dir("sft")
    return sdir / "instruct" / "model" if run.recipe.sft.data else sdir / "model"


def aligned_model_dir(run: Run) -> Path | None:
    """The align stage's model (None when the recipe aligns nothing)."""
    method = run.recipe.align.method
    return None if method == "none" else run.stage_dir("align") / method / "model"


def _sft_on_data(run: Run) -> dict:
    """SFT on the recipe's instruction sets (as `lmlab sft --data`), mixed by weight."""
    cfg = run.recipe.sft
    train_cfg = dataclasses.replace(cfg.train)
    summary = instruct(
        run.stage_dir("pretrain") / "model",
        [parse_source(spec) for spec in cfg.data],
        run.stage_dir("sft") / "instruct",
        train_cfg,
        packing=cfg.packing,
        heldout=cfg.held_out_fraction,
        seed=run.recipe.seed,
        epochs=cfg.epochs,
        peft=cfg.peft,
    )
    return {k: v for k, v in summary.items() if k != "config"}


def stage_sft(run: Run) -> dict:
    cfg = run.recipe.sft
    if cfg.data:
        return _sft_on_data(run)
    out = run.stage_dir("sft")
    # Pairs come from the training split only: the knowledge the base model has seen.
    sizes = build_pairs([run.stage_dir("data") / "documents" / "train.jsonl"], cfg, out / "pairs")
    log(
        f"sft: {sizes['train_pairs']} training pairs; {sizes['heldout_pairs']} held-out pairs "
        f"from {sizes['heldout_modules']} held-out modules"
    )
    key = hash_obj({"sft": run.recipe.resolved()["sft"], "seed": run.recipe.seed})
    summary = sft(
        run.stage_dir("pretrain") / "model",
        cfg.train,
        tokenizer_dir=run.stage_dir("tokenizer"),
        pairs_dir=out / "pairs",
        epochs=cfg.epochs,
        out_dir=out,
        seed=run.recipe.seed,
        key=key,
        peft=cfg.peft,
    )
    return {**sizes, **{k: v for k, v in summary.items() if k != "config"}}


def stage_align(run: Run) -> dict:
    """DPO on pairs built from the SFT model's own answers, or GRPO, on `align.task`; the
    held-out accuracy of the SFT and the aligned model on the same items, paired."""
    cfg = run.recipe.align
    if cfg.method == "none":
        return {"method": "none"}
    from lmlab.adapt.dpo import align_dpo
    from lmlab.adapt.grpo import align_grpo, before_after, heldout_scores, task_items
    from lmlab.adapt.pairs import build_pairs
    from lmlab.model.adapter_ops import merge_into

    seed = run.recipe.seed
    start = sft_model_dir(run)
    out = run.stage_dir("align")
    if cfg.peft is not None and run.recipe.sft.peft is not None:
        # a new adapter goes on a plain model: SFT's adapter is merged into its base first
        merged = out / "sft-merged"
        if dist_.current().main and not (merged / "model.safetensors").is_file():
            merge_into(run.stage_dir("pretrain") / "model", start, merged)
        dist_.barrier()
        start = merged
    train_cfg = dataclasses.replace(cfg.train)
    if cfg.method == "grpo":
        summary = align_grpo(
            start, out / "grpo", cfg.grpo_config(), train_cfg, seed=seed, peft=cfg.peft
        )
        return {"method": "grpo", **{k: v for k, v in summary.items() if k != "config"}}
    pairs = [Path(p) for p in cfg.data] or [out / "pairs.jsonl"]
    if not cfg.data and dist_.current().main and not pairs[0].is_file():  # resumed: kept
        built = build_pairs(
            start, pairs[0], cfg.task, cfg.prompts, cfg.k, cfg.difficulty, cfg.temperature,
            cfg.max_new_tokens, seed=seed,
        )  # fmt: skip
        log(f"align: {built['pairs']} pairs from {built['items']} items ({built['ties']} ties)")
    dist_.barrier()
    summary = align_dpo(start, pairs, out / "dpo", cfg.dpo, train_cfg, seed=seed, peft=cfg.peft)
    summary = {k: v for k, v in summary.items() if k != "config"}
    _, held = task_items(cfg.task, cfg.prompts, cfg.heldout, cfg.difficulty, seed)
    tok = load_tokenizer(start)
    scores = [
        heldout_scores(load_model(m), tok, held, cfg.task, cfg.max_new_tokens)
        for m in (start, out / "dpo" / "model")
    ]
    result = before_after(*scores)
    if held:
        log(
            f"align: held-out accuracy {result['heldout_before']:.3f} -> "
            f"{result['heldout_after']:.3f} ({len(held)} items)"
        )
    return {"method": "dpo", **summary, **result}


def model_dirs(run: Run) -> dict[str, Path]:
    """The models a run evaluates, in pipeline order: base, sft and (if any) aligned."""
    out = {"base": run.stage_dir("pretrain") / "model", "sft": sft_model_dir(run)}
    aligned = aligned_model_dir(run)
    if aligned is not None:
        out["aligned"] = aligned
    return out


# the paired differences the report shows: each tuned model against the one it started from
COMPARISONS = (("sft", "base"), ("aligned", "sft"))


def _qa(run: Run, models: dict, tok) -> dict:
    """Held-out docstring questions: the base model few-shot, the tuned ones in chat form."""
    from lmlab.eval.metrics import paired_difference
    from lmlab.eval.qa import evaluate_qa, pick_items

    cfg = run.recipe.eval
    pairs_dir = run.stage_dir("sft") / "pairs"
    if not (pairs_dir / "heldout.jsonl").is_file():  # tuned on the recipe's own data
        return {}
    with open(pairs_dir / "heldout.jsonl", encoding="utf-8") as f:
        held = [json.loads(ln) for ln in f if ln.strip()]
    with open(pairs_dir / "train.jsonl", encoding="utf-8") as f:
        train_pairs = [json.loads(ln) for ln in f if ln.strip()]
    items = pick_items(held, cfg.questions, run.recipe.seed)
    if not items:
        log("eval: no held-out questions (corpus too small or held_out_fraction 0)")
        return {}
    shots = pick_items(
        [p for p in train_pairs if p["question"].startswith("What does")],
        cfg.shots,
        run.recipe.seed + 1,
    )
    qa = {
        name: evaluate_qa(
            m,
            tok,
            items,
            "few-shot" if name == "base" else "chat",
            shots,
            cfg.max_new_tokens,
            f"{name} ({'few-shot' if name == 'base' else 'chat'})",
        )
        for name, m in models.items()
    }
    for new, old in COMPARISONS:
        if new in qa:
            for metric in ("exact_match", "rouge_l"):
                a = [r[metric] for r in qa[old]["items"]]
                b = [r[metric] for r in qa[new]["items"]]
                diff, se = paired_difference(a, b)
                qa[f"{new}_minus_{old}_{metric}"] = {"mean": diff, "se": se}
    samples = []
    for i, b in enumerate(qa["base"]["items"]):
        row = {**b, "base_rouge_l": b["rouge_l"]}
        for name in models:
            row[f"{name}_prediction"] = qa[name]["items"][i]["prediction"]
            row[f"{name}_rouge_l"] = qa[name]["items"][i]["rouge_l"]
        samples.append(row)
    write_jsonl(run.stage_dir("eval") / "samples.jsonl", samples)
    out = {
        k: ({kk: vv for kk, vv in v.items() if kk != "items"} if "items" in v else v)
        for k, v in qa.items()
    }
    out["shots"] = shots
    return out


def stage_eval(run: Run) -> dict:
    from lmlab.eval.lm import lm_metrics

    cfg = run.recipe.eval
    tok = load_tokenizer(run.stage_dir("tokenizer"))  # with its chat template
    val = open_split(run.stage_dir("tokenizer") / "tokens", "val")
    dirs = model_dirs(run)
    models = {name: load_model(d) for name, d in dirs.items()}
    seq_len = run.recipe.pretrain.seq_len
    lm = {
        name: lm_metrics(m, val, tok, seq_len, cfg.val_tokens, label=name)
        for name, m in models.items()
    }
    results = {"config": run.recipe.resolved(), "seed": run.recipe.seed, "lm": lm}
    results["qa"] = _qa(run, models, tok)
    if cfg.tasks:  # the harness on every model, the tuned ones through their chat template
        from lmlab.eval.harness import evaluate, paired_comparison

        task_dir = run.stage_dir("eval") / "tasks"
        train_docs = [run.stage_dir("data") / "documents" / "train.jsonl"]
        for name, d in dirs.items():
            evaluate(
                d,
                cfg.tasks,
                task_dir / name,
                limit=cfg.task_limit,
                seed=run.recipe.seed,
                train_docs=[d for d in train_docs if d.is_file()],
                chat=name != "base",
                owned=True,  # the stage directory is the run's, not an `lmlab eval` output
                skip_unsandboxed=True,  # the default recipe runs wherever lmlab installs
            )
        for new, old in COMPARISONS:
            if new in dirs:
                key = "tasks" if old == "base" else f"tasks_{new}_minus_{old}"
                results[key] = paired_comparison(task_dir / old, task_dir / new)
    write_json(run.stage_dir("eval") / "results.json", results)
    return {
        "lm": {
            k: {m: round(v[m], 4) for m in ("loss", "perplexity", "bits_per_byte")}
            for k, v in lm.items()
        },
        "qa": {
            k: {m: round(v[m], 4) for m in ("exact_match", "rouge_l")}
            for k, v in results["qa"].items()
            if k in models
        },
    }


def stage_report(run: Run) -> dict:
    from lmlab.run.report import write_report

    paths = write_report(run.dir)
    return {"files": [str(Path(p).name) for p in paths]}
