"""The `lmlab` command. Exit codes (DESIGN.md): 0 ok, 2 bad usage or input, 1 unexpected."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from lmlab.console import console, interrupt_hint, log, resumable, set_quiet
from lmlab.errors import UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="lmlab: raw text → tokenizer → pre-trained → instruction-tuned → "
    "evaluated model, on your laptop.",
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and results.")]


RecipeArg = Annotated[str, typer.Argument(help="Built-in recipe name or a YAML file.")]
NameOpt = Annotated[str | None, typer.Option(help="Run name (default: the recipe's).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. --set pretrain.lr=3e-4 (repeatable)."),
]
ForceOpt = Annotated[str | None, typer.Option(help="Redo this stage and the ones after it.")]
RunsDirOpt = Annotated[Path, typer.Option(help="Where run directories go.")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="A recipe YAML file (same as RECIPE).")
]
Overwrite = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace --out if it is this command's own earlier output."),
]


def _run(recipe: str, name, set_, force, runs_dir: Path, quiet: bool, until: str) -> Path:
    from lmlab.run.recipe import load_recipe
    from lmlab.run.runner import run_recipe

    set_quiet(quiet)
    resumable()
    r = load_recipe(recipe, set_ or [])
    run_dir = run_recipe(r, runs_dir, name, force, until=until)
    if r.variants and until not in ("data", "tokenizer"):
        print(f"comparison: {run_dir / 'compare.html'}  (markdown: {run_dir / 'compare.md'})")
        raise typer.Exit(0)
    return run_dir


def _recipe_arg(recipe: str, config: Path | None) -> str:
    """The recipe named positionally or by --config (not both)."""
    if config is None:
        return recipe
    if recipe != "tiny":
        raise UsageError(f"give the recipe once: {recipe!r} or --config {config}")
    return str(config)


def _stage_command(command_name: str, until: str, doc: str, group: typer.Typer = app) -> None:
    """Register `lmlab [GROUP] COMMAND [RECIPE]`: the pipeline up to and including `until`."""

    def command(
        recipe: RecipeArg = "tiny",
        config: ConfigOpt = None,
        name: NameOpt = None,
        set_: SetOpt = None,
        force: ForceOpt = None,
        runs_dir: RunsDirOpt = Path("runs"),
        quiet: Quiet = False,
    ) -> None:
        run_dir = _run(_recipe_arg(recipe, config), name, set_, force, runs_dir, quiet, until)
        if until == "report":
            print(f"report: {run_dir / 'report.html'}  (markdown: {run_dir / 'report.md'})")
        else:
            print(run_dir / until)

    command.__doc__ = doc
    group.command(name=command_name)(command)


_stage_command(
    "run",
    "report",
    "Run the whole pipeline: data → tokenizer → pretrain → sft → "
    "eval → report. Finished stages are reused; an interrupted run resumes.",
)
for _stage, _what in [
    ("tokenizer", "Train the byte-level BPE tokenizer and write the token shards."),
    ("pretrain", "Pre-train the model (resumes from its last checkpoint)."),
    ("sft", "Instruction-tune the pre-trained model on corpus question/answer pairs."),
]:
    _stage_command(
        _stage, _stage, f"{_what} Runs (or reuses) the stages before it, as `lmlab run` does."
    )


@app.command("eval")
def eval_cmd(
    target: Annotated[
        str, typer.Argument(help="A recipe (the run's eval stage) or, with --tasks, a model.")
    ] = "tiny",
    tasks: Annotated[
        list[str] | None,
        typer.Option(
            "--tasks",
            help="Task YAML file, synthetic:TASK[:DIFFICULTY] or code[:FILE] (repeatable).",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Where results go (with --tasks).")] = None,
    limit: Annotated[int | None, typer.Option(help="Items per task (with --tasks).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for few-shot sampling.")] = 0,
    train_docs: Annotated[
        list[Path] | None,
        typer.Option(help="Training documents (JSONL) to check items for contamination."),
    ] = None,
    chat: Annotated[
        bool, typer.Option(help="Built-in suites: prompt through the chat template.")
    ] = False,
    robustness: Annotated[
        bool,
        typer.Option(help="Synthetic suites: spread over prompt templates, drop under typos."),
    ] = False,
    self_consistency: Annotated[
        int, typer.Option(help="Synthetic suites: samples per item, majority vote.")
    ] = 1,
    compare_to: Annotated[
        Path | None,
        typer.Option(help="Another `lmlab eval` output: paired differences on shared tasks."),
    ] = None,
    overwrite: Overwrite = False,
    unsafe_sandbox: Annotated[
        bool,
        typer.Option(
            "--unsafe-sandbox",
            help="Code tasks without bubblewrap: the weak, audit-hook-only sandbox (unsafe).",
        ),
    ] = False,
    config: ConfigOpt = None,
    name: NameOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    quiet: Quiet = False,
) -> None:
    """Evaluate the base and SFT models of a recipe's run (runs or reuses the stages before
    it), or, with --tasks, score a model on task files (lm-evaluation-harness YAML shape)."""
    if not tasks:
        recipe = _recipe_arg(target, config)
        print(_run(recipe, name, set_, force, runs_dir, quiet, "eval") / "eval")
        return
    from lmlab.eval.harness import evaluate, format_results

    set_quiet(quiet)
    if unsafe_sandbox:
        from lmlab.eval.sandbox import UNSAFE_ENV

        os.environ[UNSAFE_ENV] = "1"
    if limit is not None and limit < 1:
        raise UsageError("--limit must be >= 1")
    if self_consistency < 1:
        raise UsageError("--self-consistency must be >= 1")
    out_dir = out or Path(target) / "eval-tasks"
    results = evaluate(
        target,
        tasks,
        out_dir,
        limit=limit,
        seed=seed,
        train_docs=train_docs,
        chat=chat,
        robustness=robustness,
        self_consistency=self_consistency,
        overwrite=overwrite,
    )
    print(format_results(results))
    if compare_to is not None:
        from lmlab.eval.harness import paired_comparison
        from lmlab.utils import write_json

        if not (compare_to / "results.json").is_file():
            raise UsageError(f"--compare-to {compare_to}: no results.json (an `lmlab eval` output)")
        diff = paired_comparison(compare_to, out_dir)
        write_json(out_dir / "paired.json", diff)
        for task, metrics in diff.items():
            for m, d in metrics.items():
                print(
                    f"{task} {m}: this − other {d['diff']:+.4f} ± {d['stderr'] or 0:.4f} "
                    f"(p {d['p_value'] if d['p_value'] is not None else float('nan'):.3f})"
                )
    print(f"results: {out_dir / 'results.json'}")


data_app = typer.Typer(
    no_args_is_help=True,
    help="The data pipeline: filter, de-duplicate, redact, decontaminate, mix, tokenize.",
)
app.add_typer(data_app, name="data")


_stage_command("run", "data", "The recipe's data stage (what `lmlab run` does first).", data_app)


Inputs = Annotated[
    list[str] | None,
    typer.Argument(
        help="Files or directories (txt/md/html, jsonl[.gz|.zst], parquet, csv), "
        "'stdlib' for the embedded corpus, or hf:NAME for a Hugging Face dataset."
    ),
]


@data_app.command("prepare")
def data_prepare(
    inputs: Inputs = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("data-out"),
    config: Annotated[
        Path | None, typer.Option("--config", help="Pipeline YAML (sources, steps, schedule...).")
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="tokenizer.json or a run/checkpoint dir: also write shards.")
    ] = None,
    decontaminate: Annotated[
        list[str] | None,
        typer.Option(help="Evaluation JSONL to check for n-gram overlap (repeatable)."),
    ] = None,
    contaminated: Annotated[
        str, typer.Option(help="What to do with overlapping documents: flag or drop.")
    ] = "flag",
    profile: Annotated[
        str | None, typer.Option(help="Default rule thresholds: web or code.")
    ] = None,
    text_field: Annotated[str | None, typer.Option(help="JSONL/CSV/Parquet text column.")] = None,
    unit: Annotated[
        str | None, typer.Option(help="Text files: one document per file, line or paragraph.")
    ] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Share kept for validation.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default: cores).")] = None,
    executor: Annotated[str | None, typer.Option(help="local or ray.")] = None,
    quiet: Quiet = False,
) -> None:
    """Run the data pipeline on INPUT files into --out (documents, removed, stats, card)."""
    from lmlab.data.pipeline import cli_config, prepare

    set_quiet(quiet)
    resumable()
    cfg = cli_config(
        inputs or [],
        config,
        decontaminate=decontaminate or [],
        contaminated=contaminated,
        overrides={
            "profile": profile,
            "val_fraction": val_fraction,
            "workers": workers,
            "executor": executor,
        },
        source_overrides={"text_field": text_field, "unit": unit},
    )
    prepare(cfg, out, tokenizer=tokenizer)
    print(f"{out}  (card: {out / 'card.html'})")


@data_app.command("steps")
def data_steps(
    profile: Annotated[str, typer.Option(help="Show the defaults of this profile.")] = "web",
) -> None:
    """List the pipeline steps a config can use, with every option and its default."""
    from lmlab.data.steps import describe_steps

    print(describe_steps(profile), end="")


@data_app.command("index")
def data_index(
    inputs: Inputs = None,
    out: Annotated[Path, typer.Option("--out", help="Index file to write (.npz).")] = Path(
        "dedup-index.npz"
    ),
    config: Annotated[
        Path | None, typer.Option("--config", help="Pipeline YAML: sources and minhash settings.")
    ] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Build a de-duplication index of a dataset, for `dedup_index` steps of later runs."""
    from lmlab.data.pipeline import build_dedup_index, cli_config

    set_quiet(quiet)
    cfg = cli_config(inputs or [], config)
    n = build_dedup_index(cfg, out, overwrite=overwrite)
    print(f"{out}  ({n:,} documents)")


model_app = typer.Typer(no_args_is_help=True, help="Architectures: presets, sizes, costs.")
app.add_typer(model_app, name="model")

from lmlab.run.scaling import scaling_app  # noqa: E402  (light: heavy imports are lazy)

app.add_typer(scaling_app, name="scaling")


@model_app.command("info")
def model_info(
    target: Annotated[str, typer.Argument(help="A preset name, or a checkpoint/run/HF dir.")],
    size: Annotated[str | None, typer.Option(help="Parameter budget, e.g. 10M.")] = None,
    layers: Annotated[int | None, typer.Option(help="Layers (with a preset).")] = None,
    width: Annotated[int | None, typer.Option(help="Model width (with a preset).")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Context for FLOPs and KV cache.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field: --set norm=layernorm.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Print an architecture with its parameters, FLOPs per token and KV-cache bytes."""
    from lmlab.model.info import config_of, info_json, info_rows
    from lmlab.run.recipe import parse_override

    overrides = {}
    for item in set_ or []:
        keys, value = parse_override(item)
        overrides[".".join(keys)] = value
    cfg = config_of(target, size, layers, width, overrides)
    if seq_len is not None and seq_len <= 0:
        raise UsageError(f"--seq-len must be > 0, got {seq_len}")
    if as_json:
        print(info_json(cfg, seq_len))
        return
    from rich.table import Table

    table = Table(title=f"model {target}", show_header=False)
    for k, v in info_rows(cfg, seq_len):
        table.add_row(k, v)
    console.print(table)


@model_app.command("presets")
def model_presets() -> None:
    """List the presets and the architecture choices each fixes (Zhao et al. Table 3)."""
    from rich.table import Table

    from lmlab.model.info import PRESET_COLUMNS, preset_rows

    table = Table(*PRESET_COLUMNS)
    table.columns[0].no_wrap = True
    for row in preset_rows():
        table.add_row(*row)
    console.print(table)


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="A Hugging Face model directory.")],
    out: Annotated[Path, typer.Option("--out", help="The lmlab checkpoint to write.")],
    from_hf: Annotated[bool, typer.Option("--from-hf", help="Convert from Hugging Face.")] = True,
    overwrite: Overwrite = False,
) -> None:
    """Convert a Hugging Face model (Llama, Mistral, Qwen2, GPT-2, GPT-NeoX, OPT, BLOOM, T5)
    into an lmlab checkpoint."""
    from lmlab.model.hf import convert_from_hf

    print(convert_from_hf(src, out, overwrite=overwrite))


@app.command()
def export(
    ckpt: Annotated[Path, typer.Argument(help="An lmlab checkpoint or run directory.")],
    out: Annotated[Path, typer.Option("--out", help="The directory (hf) or file (gguf).")],
    to: Annotated[str, typer.Option("--to", "--format", help="Target format: hf or gguf.")] = "hf",
    family: Annotated[
        str | None, typer.Option(help="HF family (default: the one the config matches).")
    ] = None,
    qtype: Annotated[str, typer.Option(help="GGUF tensor type: f32, f16, q8_0 or q4_0.")] = "f16",
    no_tokenizer: Annotated[
        bool, typer.Option("--no-tokenizer", help="hf: export a checkpoint that has none.")
    ] = False,
    overwrite: Overwrite = False,
) -> None:
    """Export a checkpoint as a Hugging Face model directory (loads with AutoModel*) or a
    GGUF file for llama.cpp (LLaMA-family checkpoints)."""
    from lmlab.model.checkpoint import resolve_checkpoint

    if to == "gguf":
        from lmlab.infer.gguf import export_gguf

        print(export_gguf(resolve_checkpoint(ckpt), out, qtype, overwrite=overwrite))
        return
    if to != "hf":
        raise UsageError(f"--to {to}: unknown format (known: hf, gguf)")
    from lmlab.model.hf import export_to_hf

    print(
        export_to_hf(
            resolve_checkpoint(ckpt),
            out,
            family=family,
            overwrite=overwrite,
            tokenizer=not no_tokenizer,
        )
    )


@app.command()
def recipes(
    show: Annotated[str | None, typer.Argument(help="Print this recipe, fully resolved.")] = None,
) -> None:
    """List the built-in recipes, or print one with every default filled in."""
    from lmlab.run.recipe import builtin_recipes, dump_recipe, load_recipe

    if show is None:
        print("\n".join(builtin_recipes()))
    else:
        print(dump_recipe(load_recipe(show)), end="")


Temperature = Annotated[float, typer.Option(help="0 = greedy; > 0 samples.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (1 = off).")]
TopK = Annotated[int, typer.Option("--top-k", help="Sample among the k likeliest (0 = off).")]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", help="Generation length limit.")]
Seed = Annotated[int | None, typer.Option(help="Seed for sampling.")]


def _early_stopping(text: str) -> bool | str:
    table = {"true": True, "false": False, "never": "never"}
    if text.lower() not in table:
        raise UsageError(f"--early-stopping {text}: use true, false or never")
    return table[text.lower()]


def _load_for_generation(path: str, stop_at_end_of_turn: bool, **options):
    """Model, tokenizer and validated decoding settings for `generate` and `chat`."""
    from lmlab import load_model, load_tokenizer
    from lmlab.infer.sampling import GenerationConfig
    from lmlab.model.checkpoint import resolve_checkpoint
    from lmlab.tokenizer import END, EOS, special_id

    cfg = GenerationConfig(**options).validate()  # bad settings fail before loading
    ckpt = resolve_checkpoint(path)
    m, tok = load_model(ckpt), load_tokenizer(ckpt)
    cfg.stop_ids = [special_id(tok, EOS)]
    if stop_at_end_of_turn:
        cfg.stop_ids.append(special_id(tok, END))
    return m, tok, cfg, ckpt


def _stream_reply(
    model, tok, prompt_ids: list[int], cfg, out: list[int] | None = None, **kw
) -> list[int]:
    """Generate, writing text to stdout as it comes; returns the generated ids (also
    appended to `out` as they come, so an interrupted caller keeps the part said)."""
    from lmlab.infer.generate import TextStreamer, stream

    streamer = TextStreamer(tok)
    ids = out if out is not None else []
    for t in stream(model, prompt_ids, cfg, tokenizer=tok, **kw):
        ids.append(t)
        sys.stdout.write(streamer.push(t))
        sys.stdout.flush()
    sys.stdout.write("\n")
    return ids


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="A run directory or a checkpoint directory.")],
    prompt: Annotated[
        list[str], typer.Option(help="Text to continue (repeat for a batch of prompts).")
    ],
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    min_p: Annotated[float, typer.Option(help="Drop tokens below min-p x the top one.")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help="CTRL penalty (1 = off).")] = 1.0,
    presence_penalty: Annotated[float, typer.Option(help="Minus this once seen.")] = 0.0,
    frequency_penalty: Annotated[float, typer.Option(help="Minus this per use.")] = 0.0,
    no_repeat_ngram_size: Annotated[int, typer.Option(help="Never repeat an n-gram.")] = 0,
    max_new_tokens: MaxNew = 100,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    n: Annotated[int, typer.Option("-n", "--n", help="Samples per prompt.")] = 1,
    num_beams: Annotated[int, typer.Option(help="Beam search width (1 = off).")] = 1,
    length_penalty: Annotated[float, typer.Option(help="Beam score / length^this.")] = 1.0,
    early_stopping: Annotated[str, typer.Option(help="Beams: true, false or never.")] = "false",
    num_return_sequences: Annotated[int, typer.Option(help="Beams: the n best.")] = 1,
    logprobs: Annotated[
        int | None, typer.Option(help="Report log-probs of the chosen and top-k tokens.")
    ] = None,
    seed: Seed = None,
    draft: Annotated[
        str | None, typer.Option(help="Speculative decoding with this draft model.")
    ] = None,
    gamma: Annotated[int, typer.Option(help="Draft tokens per speculative round.")] = 4,
    amateur: Annotated[
        str | None, typer.Option(help="Contrastive decoding against this amateur model.")
    ] = None,
    cd_alpha: Annotated[float, typer.Option(help="Contrastive plausibility threshold.")] = 0.1,
    amateur_temperature: Annotated[float, typer.Option(help="Amateur's temperature.")] = 1.0,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the chat template.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON line per output.")] = False,
) -> None:
    """Continue prompts with any decoding strategy; a single plain prompt streams its text.
    Interrupted, it prints the outputs that had finished."""
    from lmlab import load_model
    from lmlab.infer.generate import Contrast, finish_text, generate_batch
    from lmlab.infer.speculative import speculative_generate
    from lmlab.tokenizer import format_chat

    if draft and amateur:
        raise UsageError("--draft and --amateur: choose speculative or contrastive decoding")
    m, tok, cfg, _ = _load_for_generation(
        model,
        stop_at_end_of_turn=chat,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        max_new_tokens=max_new_tokens,
        stop_strings=stop or [],
        n=n,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=_early_stopping(early_stopping),
        num_return_sequences=num_return_sequences,
        logprobs=logprobs,
        seed=seed,
    )
    texts = [format_chat([{"role": "user", "content": p}]) if chat else p for p in prompt]
    ids = [tok.encode(t).ids for t in texts]
    contrast = Contrast(load_model(amateur), cd_alpha, amateur_temperature) if amateur else None
    simple = len(prompt) == 1 and n == 1 and num_beams == 1 and logprobs is None
    if simple and not json_out and not draft:
        sys.stdout.write(prompt[0] if not chat else "")
        _stream_reply(m, tok, ids[0], cfg, contrast=contrast)
        return
    stats = None
    if draft:
        if len(prompt) != 1:
            raise UsageError("--draft: speculative decoding takes one --prompt")
        comp, stats = speculative_generate(m, load_model(draft), ids[0], cfg, gamma, tok)
        comps = [comp]
    else:
        comps = []
        try:
            generate_batch(m, ids, cfg, tokenizer=tok, contrast=contrast, out=comps)
        except KeyboardInterrupt:  # print what finished, then report the interrupt
            comps = [c for c in comps if c.finish_reason == "stop"]
            finish_text(comps, tok, cfg)
            _print_completions(comps, prompt, tok, chat, json_out)
            raise
    _print_completions(comps, prompt, tok, chat, json_out)
    if stats is not None:
        log("speculative: " + ", ".join(f"{k} {v}" for k, v in stats.as_dict().items()))


def _print_completions(comps, prompt: list[str], tok, chat: bool, json_out: bool) -> None:
    import json

    for c in comps:
        if json_out:
            row = {
                "prompt": prompt[c.prompt_index],
                "text": c.text,
                "tokens": c.tokens,
                "finish_reason": c.finish_reason,
            }
            if c.score is not None:
                row["score"] = c.score
            if c.logprobs is not None:
                row["logprobs"] = c.logprobs
                row["top_logprobs"] = [
                    [{"token": tok.decode([i]), "id": i, "logprob": v} for i, v in top]
                    for top in c.top_logprobs
                ]
            print(json.dumps(row, ensure_ascii=False))
        else:
            head = f"[{c.prompt_index}]" + (f" score {c.score:.4f}" if c.score is not None else "")
            print(f"{head} {prompt[c.prompt_index] if not chat else ''}{c.text}")
            if c.logprobs is not None:
                print(f"  logprob sum {sum(c.logprobs):.4f}")


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="A run directory or a checkpoint directory.")],
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    max_new_tokens: MaxNew = 100,
    seed: Seed = None,
) -> None:
    """Talk to a model, several turns, through its chat template. /reset clears, /history
    shows the conversation, /exit quits. Ctrl-C stops a reply; at the prompt it quits."""
    from lmlab.tokenizer import format_chat

    m, tok, cfg, ckpt = _load_for_generation(
        model,
        stop_at_end_of_turn=True,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    log(
        f"chatting with {ckpt} (context {m.cfg.max_seq_len} tokens); /reset, /history, /exit; "
        "Ctrl-C stops a reply, Ctrl-C at the prompt quits"
    )
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        try:
            if interactive:
                sys.stdout.write("you> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
        except KeyboardInterrupt:  # at the prompt: the user is leaving
            sys.stdout.write("\n")
            break
        if not line:
            break
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = []
            continue
        if line == "/history":
            for turn in history:
                print(f"[{turn['role']}] {turn['content']}")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write("model> ")
        sys.stdout.flush()
        reply: list[int] = []
        try:
            _stream_reply(m, tok, tok.encode(format_chat(history)).ids, cfg, out=reply)
        except KeyboardInterrupt:  # stop this reply only; what it said stays in the history
            sys.stdout.write(" [stopped]\n")
        history.append({"role": "assistant", "content": tok.decode(reply)})


@app.command()
def quantize(
    ckpt: Annotated[str, typer.Argument(help="A checkpoint or run directory.")],
    method: Annotated[str, typer.Option(help="int8, int4 or llm_int8.")],
    out: Annotated[Path, typer.Option("--out", help="The quantized checkpoint to write.")],
    group_size: Annotated[int, typer.Option(help="int4: weights per scale (32/64/128).")] = 64,
    threshold: Annotated[float, typer.Option(help="llm_int8: outlier magnitude.")] = 6.0,
    include_lm_head: Annotated[bool, typer.Option(help="Quantize the output head too.")] = False,
    eval_data: Annotated[
        Path | None, typer.Option(help="Token shards or a run for the perplexity check.")
    ] = None,
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens to score.")] = 50_000,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Post-training weight quantization, with a size / memory / speed / perplexity report."""
    from lmlab.infer.quant import format_report, quantize_checkpoint

    set_quiet(quiet)
    report = quantize_checkpoint(
        ckpt,
        out,
        method,
        group_size=group_size,
        threshold=threshold,
        include_lm_head=include_lm_head,
        eval_tokens=eval_tokens,
        progress=not quiet,
        eval_data=eval_data,
        overwrite=overwrite,
    )
    print(format_report(report))


@app.command()
def judge(
    judge_model: Annotated[str, typer.Option("--judge", help="The judge checkpoint.")],
    model: Annotated[list[str], typer.Option(help="A checkpoint to rate (repeat, >= 2).")],
    questions: Annotated[Path, typer.Option(help="JSONL with a 'question' field per line.")],
    out: Annotated[Path, typer.Option(help="Where judge.json goes.")] = Path("judge.json"),
    limit: Annotated[int | None, typer.Option(help="Questions to use.")] = None,
    chat: Annotated[bool, typer.Option(help="Ask through the chat template.")] = False,
    max_new_tokens: MaxNew = 64,
    overwrite: Overwrite = False,
) -> None:
    """Model-based evaluation: every model answers, a judge model compares every pair in
    both orders (position bias cancels), and the models get Elo and Bradley-Terry ratings."""
    import json

    from lmlab.eval.judge import format_ratings, judge_models
    from lmlab.utils import claim_output_file, json_with, write_json

    if not questions.is_file():
        raise UsageError(f"--questions {questions}: no such file")
    claim_output_file(out, "judge results", json_with("verdicts"), overwrite=overwrite)
    qs = []
    for i, line in enumerate(questions.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            qs.append(str(json.loads(line)["question"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"{questions}:{i}: expected a JSON object with 'question'") from None
    res = judge_models(judge_model, model, qs[:limit], chat=chat, max_new_tokens=max_new_tokens)
    write_json(out, res)
    print(format_ratings(res))
    print(f"verdicts: {out}")


bench_app = typer.Typer(help="Measure speed on this machine.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("infer")
def bench_infer_cmd(
    ckpt: Annotated[str, typer.Argument(help="A checkpoint or run directory.")],
    batch: Annotated[
        list[int] | None, typer.Option(help="Batch size (repeatable; default 1 and 8).")
    ] = None,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens per row.")] = 128,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per row.")] = 64,
    repeats: Annotated[int, typer.Option(help="Timed runs per batch size (best kept).")] = 3,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: all).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here.")] = None,
) -> None:
    """Prefill and decode tokens/s, per-token latency at batch 1 and N, and peak memory."""
    import torch

    from lmlab import load_model
    from lmlab.infer.bench import bench_infer, format_bench
    from lmlab.utils import claim_output_file, json_with, write_json

    if json_out is not None:  # its own earlier report is replaced; any other file is kept
        claim_output_file(json_out, "bench report", json_with("threads", "results"), True, "--json")
    if threads is not None:
        if threads < 1:
            raise UsageError("--threads must be >= 1")
        torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device here")
    model = load_model(ckpt, device=device)
    report = bench_infer(model, batch or [1, 8], prompt_len, new_tokens, repeats)
    print(format_bench(report))
    if json_out is not None:
        write_json(json_out, report)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Render report.md and report.html for a run from the files it holds."""
    from lmlab.run.report import write_report
    from lmlab.utils import dir_lock

    if not (run_dir / "manifest.json").is_file():
        raise UsageError(f"{run_dir}: not a run directory (no manifest.json)")
    with dir_lock(run_dir):  # not while a run is writing it
        paths = write_report(run_dir)
    for p in paths:
        print(p)


def main() -> None:
    try:
        rc = app(standalone_mode=False)  # returns 130 when the command was interrupted
        if rc == 130:
            console.print(interrupt_hint())
        if isinstance(rc, int):
            sys.exit(rc)
    except UsageError as e:
        console.print(f"[red]error:[/red] {e}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print(interrupt_hint())
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:
        # the CLI framework's own usage errors (missing argument, bad option) know their exit
        # code (2) and how to show themselves; typer may vendor click, so match by behaviour
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
