"""`lmlab adapt`: parameter-efficient adapters (docs/peft.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.console import log

adapt_app = typer.Typer(help="Adapters: merge one into its base model.", no_args_is_help=True)
app.add_typer(adapt_app, name="adapt")


@adapt_app.command("merge")
def merge_cmd(
    base: Annotated[str, typer.Argument(help="The base model (any form lmlab loads).")],
    adapter: Annotated[Path, typer.Argument(help="An adapter directory (lmlab's or PEFT's).")],
    out: Annotated[Path, typer.Option(help="Output checkpoint directory (new or empty).")],
    quantize: Annotated[
        str | None, typer.Option(help="Quantize the merged model again: int8 or int4.")
    ] = None,
    group_size: Annotated[int, typer.Option(help="int4: inputs per scale.")] = 64,
) -> None:
    """Fold ADAPTER into BASE and write a plain checkpoint with BASE's tokenizer, which
    every verb loads without the adapter machinery (and exports anywhere). A quantized
    BASE is dequantized to merge; --quantize quantizes the result again."""
    from lmlab.errors import UsageError
    from lmlab.model.adapter_ops import merge_into

    if quantize not in (None, "int8", "int4"):
        raise UsageError(f"--quantize: int8 or int4, got {quantize!r}")
    summary = merge_into(base, adapter, out, quantize, group_size)
    done = f"merged {summary['method']} adapter ({summary['layers']} layers) into {base}"
    if quantize:
        done += f"; quantized {quantize}, weight error {summary['weight_error']:.4f}"
    log(f"{done}; wrote {out}")
