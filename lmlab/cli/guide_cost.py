"""`lmlab guide cost`: training cost and serving latency bounds for a model on a device."""

from __future__ import annotations

from typing import Annotated

import typer

from lmlab.cli.guide import guide_app
from lmlab.errors import UsageError


@guide_app.command("cost")
def guide_cost(
    target: Annotated[
        str | None,
        typer.Argument(help="A preset name (with --size), or a checkpoint/run/store name."),
    ] = None,
    catalog: Annotated[
        str | None,
        typer.Option(
            help="A catalog model instead (`lmlab guide catalog`): its size, a preset's shape."
        ),
    ] = None,
    size: Annotated[str | None, typer.Option(help="Parameter budget of a preset, e.g. 7B.")] = None,
    layers: Annotated[int | None, typer.Option(help="Layers (with a preset).")] = None,
    width: Annotated[int | None, typer.Option(help="Model width (with a preset).")] = None,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens per request.")] = 512,
    output_tokens: Annotated[int, typer.Option(help="Output tokens per request.")] = 128,
    requests: Annotated[int, typer.Option(help="Requests in the workload.")] = 1000,
    batch: Annotated[int, typer.Option(help="Requests decoded together.")] = 1,
    hardware: Annotated[
        str, typer.Option(help="A named accelerator (h100-sxm, a100-80gb, l4, ...) or 'this'.")
    ] = "this",
    precision: Annotated[str, typer.Option(help="Weights: fp32, bf16, fp16, int8, int4.")] = "bf16",
    train_tokens: Annotated[
        float | None, typer.Option(help="Training tokens (default 20 per parameter).")
    ] = None,
    mfu: Annotated[float, typer.Option(help="Assumed training MFU, in (0, 1].")] = 0.4,
    price_per_hour: Annotated[
        float | None, typer.Option(help="Device price per hour, for a cost.")
    ] = None,
    measure: Annotated[
        bool,
        typer.Option(help="Also time lmlab's prefill and decode here and compare with the bound."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Estimate training FLOPs and time, prefill and decode latency lower bounds (compute
    and memory bandwidth), and weight and KV-cache memory at each precision (docs/cost.md)."""
    import json

    from lmlab.guide import cost
    from lmlab.model.info import config_of

    cost.check_precision(precision)
    workload = cost.Workload(prompt_tokens, output_tokens, requests, batch)
    if hardware != "this" and hardware not in cost.ACCELERATORS:
        cost.hardware(hardware)  # raises the UsageError naming what is allowed
    note = None
    if (target is None) == (catalog is None):
        raise UsageError("give a MODEL (preset, checkpoint or store name) or --catalog NAME")
    if catalog is not None:
        if measure or size or layers or width:
            raise UsageError("--catalog takes no --size/--layers/--width/--measure")
        cfg, tokens, note = cost.catalog_config(catalog)
        train_tokens = train_tokens if train_tokens is not None else tokens
    else:
        cfg = config_of(target, size, layers, width)
    hw = cost.hardware(hardware, precision)
    report = cost.estimate(cfg, workload, hw, precision, train_tokens, mfu, price_per_hour)
    if note:
        report["notes"].insert(0, note)
    measured = None
    if measure:
        assert target is not None  # --catalog refuses --measure above
        measured = cost.measure(_load(target, cfg), hw=hw if hardware == "this" else None)
        report["measured"] = measured
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(cost.format_estimate(report, measured))


def _load(target: str, cfg):
    """The model to time: a checkpoint as saved; a preset with random weights (speed does not
    depend on their values)."""
    import torch

    from lmlab.guide.cost import this_device
    from lmlab.model.presets import PRESETS

    device = this_device()
    if target in PRESETS:
        if cfg.num_params() > 2e9:
            raise UsageError(f"--measure builds {target} here: {cfg.num_params():,} is too large")
        from lmlab.model.transformer import Transformer

        torch.manual_seed(0)
        return Transformer(cfg).to(device).eval()
    from lmlab.model.loading import load_model

    return load_model(target, device=str(device))
