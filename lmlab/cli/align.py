"""`lmlab align`: alignment tuning from preferences (today: the DPO family)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.console import log

align_app = typer.Typer(help="Align a model with preference data.", no_args_is_help=True)
app.add_typer(align_app, name="align")


@align_app.command("dpo")
def dpo_cmd(
    model: Annotated[
        str, typer.Argument(help="A run or checkpoint directory, an HF directory, a GGUF file.")
    ],
    data: Annotated[
        list[Path],
        typer.Option(help="Preference JSONL: prompt, chosen, rejected (repeatable)."),
    ],
    out: Annotated[Path, typer.Option(help="Output directory (resumed if it is this command's).")],
    beta: Annotated[float, typer.Option(help="Strength of the pull toward the reference.")] = 0.1,
    loss_type: Annotated[
        str, typer.Option(help="sigmoid (DPO), robust, hinge, ipo; simpo, orpo (no reference).")
    ] = "sigmoid",
    simpo_gamma: Annotated[float, typer.Option(help="SimPO's target reward margin.")] = 0.5,
    label_smoothing: Annotated[
        float, typer.Option(help="> 0: conservative DPO (sigmoid) or robust DPO.")
    ] = 0.0,
    heldout: Annotated[float, typer.Option(help="Share of pairs kept for validation.")] = 0.1,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: one pass).")] = None,
    batch_size: Annotated[int, typer.Option(help="Pairs per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 5e-6,
    seq_len: Annotated[int, typer.Option(help="Longest prompt + completion in tokens.")] = 512,
    seed: Annotated[int, typer.Option(help="Data order and held-out split.")] = 0,
) -> None:
    """Preference optimisation: DPO, cDPO, robust DPO, SLiC hinge, IPO (the reference's
    log-probs computed once), SimPO and ORPO (no reference); writes an ordinary checkpoint
    to OUT/model."""
    from pydantic import TypeAdapter, ValidationError

    from lmlab.adapt.dpo import DPOConfig, align_dpo
    from lmlab.errors import UsageError
    from lmlab.train.loop import TrainConfig

    try:
        dpo = TypeAdapter(DPOConfig).validate_python(
            dict(
                beta=beta,
                loss_type=loss_type,
                label_smoothing=label_smoothing,
                simpo_gamma=simpo_gamma,
                heldout=heldout,
            )
        )
        cfg = TypeAdapter(TrainConfig).validate_python(
            dict(
                batch_size=batch_size,
                seq_len=seq_len,
                lr=lr,
                max_steps=steps or 1,  # without --steps: one pass, set once the pairs are read
                warmup_steps=0,
                weight_decay=0.0,
                eval_every=max(1, steps or 50),
                log_every=1,
            )
        )
    except ValidationError as e:
        first = e.errors()[0]
        raise UsageError(
            f"align dpo: --{first['loc'][0]}: {first['msg']}".replace("_", "-")
        ) from None
    summary = align_dpo(model, list(data), out, dpo, cfg, seed=seed, one_pass=steps is None)
    log(f"dpo: wrote {out / 'model'} ({summary.get('steps', '?')} steps, {summary['pairs']} pairs)")
