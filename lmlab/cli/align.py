"""`lmlab align`: alignment tuning from preferences: the DPO family and reward models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.cli.pipeline import PeftOpt, stage_command
from lmlab.console import log

align_app = typer.Typer(
    help="Align a model: preference optimisation, reward models, PPO, GRPO; `run`: a recipe stage.",
    no_args_is_help=True,
)
app.add_typer(align_app, name="align")
stage_command(
    "run",
    "align",
    "The recipe's align stage (align.method), after the stages before it.",
    align_app,
)

ModelArg = Annotated[
    str, typer.Argument(help="A run or checkpoint directory, an HF directory, a GGUF file.")
]
DataOpt = Annotated[
    list[Path], typer.Option(help="Preference JSONL: prompt, chosen, rejected (repeatable).")
]
OutOpt = Annotated[Path, typer.Option(help="Output directory (resumed if it is this command's).")]
HeldoutOpt = Annotated[float, typer.Option(help="Share of pairs kept for validation.")]
StepsOpt = Annotated[int | None, typer.Option(help="Optimizer steps (default: one pass).")]
BatchOpt = Annotated[int, typer.Option(help="Pairs per step.")]
SeqOpt = Annotated[int, typer.Option(help="Longest prompt + completion in tokens.")]
SeedOpt = Annotated[int, typer.Option(help="Data order and held-out split.")]
TaskOpt = Annotated[
    str, typer.Option(help="A generated reasoning task with exact answers (lmlab eval).")
]
DifficultyOpt = Annotated[int, typer.Option(help="The task's difficulty.")]
HeldoutItemsOpt = Annotated[int, typer.Option(help="Held-out items, scored before and after.")]
AnswerLenOpt = Annotated[int, typer.Option(help="Longest answer in tokens.")]
TemperatureOpt = Annotated[float, typer.Option(help="Sampling temperature.")]
LrOpt = Annotated[float, typer.Option(help="Peak learning rate.")]


def _configs(what: str, method: type, method_args: dict, train_args: dict):
    """The method's config and the TrainConfig, validated before any work (exit 2 naming
    the flag)."""
    from pydantic import TypeAdapter, ValidationError

    from lmlab.errors import UsageError
    from lmlab.train.loop import TrainConfig

    steps = train_args.pop("steps")
    try:
        m = TypeAdapter(method).validate_python(method_args)
        cfg = TypeAdapter(TrainConfig).validate_python(
            dict(
                **train_args,
                max_steps=steps or 1,  # without --steps: one pass, set once the pairs are read
                warmup_steps=0,
                weight_decay=0.0,
                eval_every=max(1, steps or 50),
                log_every=1,
            )
        )
    except ValidationError as e:
        first = e.errors()[0]
        flag = str(first["loc"][0]).replace("_", "-")
        raise UsageError(f"align {what}: --{flag}: {first['msg']}") from None
    return m, cfg, steps is None


def _heldout(summary: dict) -> str:
    """The held-out accuracy before and after, with the paired difference."""
    if not summary.get("heldout_items"):
        return "no held-out items scored"
    s = summary
    return (
        f"held-out accuracy {s['heldout_before']:.3f} -> {s['heldout_after']:.3f} "
        f"({s['heldout_diff']:+.3f} ± {s['heldout_diff_se']:.3f} paired SE, "
        f"{s['heldout_items']} items)"
    )


@align_app.command("dpo")
def dpo_cmd(
    model: ModelArg,
    data: DataOpt,
    out: OutOpt,
    beta: Annotated[float, typer.Option(help="Strength of the pull toward the reference.")] = 0.1,
    loss_type: Annotated[
        str, typer.Option(help="sigmoid (DPO), robust, hinge, ipo; simpo, orpo (no reference).")
    ] = "sigmoid",
    simpo_gamma: Annotated[float, typer.Option(help="SimPO's target reward margin.")] = 0.5,
    label_smoothing: Annotated[
        float, typer.Option(help="> 0: conservative DPO (sigmoid) or robust DPO.")
    ] = 0.0,
    reference: Annotated[
        str, typer.Option(help="cached: reference log-probs once; live: a frozen copy.")
    ] = "cached",
    heldout: HeldoutOpt = 0.1,
    steps: StepsOpt = None,
    batch_size: BatchOpt = 8,
    lr: LrOpt = 5e-6,
    seq_len: SeqOpt = 512,
    seed: SeedOpt = 0,
    peft: PeftOpt = None,
) -> None:
    """Preference optimisation: DPO, cDPO, robust DPO, SLiC hinge, IPO (the reference's
    log-probs computed once), SimPO and ORPO (no reference); writes an ordinary checkpoint
    to OUT/model."""
    from lmlab.adapt.dpo import DPOConfig, align_dpo
    from lmlab.model.adapters import parse_peft

    dpo, cfg, one_pass = _configs(
        "dpo",
        DPOConfig,
        dict(
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
            simpo_gamma=simpo_gamma,
            heldout=heldout,
            reference=reference,
        ),
        dict(batch_size=batch_size, seq_len=seq_len, lr=lr, steps=steps),
    )
    summary = align_dpo(
        model, list(data), out, dpo, cfg, seed=seed, one_pass=one_pass, peft=parse_peft(peft)
    )
    log(f"dpo: wrote {out / 'model'} ({summary.get('steps', '?')} steps, {summary['pairs']} pairs)")


@align_app.command("rm")
def rm_cmd(
    model: ModelArg,
    data: DataOpt,
    out: OutOpt,
    center_coefficient: Annotated[
        float | None, typer.Option(help="Weight of mean((r_c + r_r)^2): keeps scores near 0.")
    ] = None,
    heldout: HeldoutOpt = 0.1,
    steps: StepsOpt = None,
    batch_size: BatchOpt = 8,
    lr: LrOpt = 1e-5,
    seq_len: SeqOpt = 512,
    seed: SeedOpt = 0,
    peft: PeftOpt = None,
) -> None:
    """Train a reward model (a scalar head on the decoder, Bradley-Terry loss) on
    preference pairs; OUT/model loads anywhere and exports to HF as sequence
    classification (with --peft: an adapter that trains the head with it)."""
    from lmlab.adapt.reward import RewardConfig, align_rm
    from lmlab.model.adapters import parse_peft

    peft_cfg = parse_peft(peft)

    rm, cfg, one_pass = _configs(
        "rm",
        RewardConfig,
        dict(center_coefficient=center_coefficient, heldout=heldout),
        dict(batch_size=batch_size, seq_len=seq_len, lr=lr, steps=steps),
    )
    summary = align_rm(model, list(data), out, rm, cfg, seed=seed, one_pass=one_pass, peft=peft_cfg)
    log(f"rm: wrote {out / 'model'} ({summary.get('steps', '?')} steps, {summary['pairs']} pairs)")


@align_app.command("grpo")
def grpo_cmd(
    model: ModelArg,
    out: OutOpt,
    task: TaskOpt = "addition",
    difficulty: DifficultyOpt = 1,
    prompts: Annotated[int, typer.Option(help="Training items.")] = 256,
    heldout: HeldoutItemsOpt = 32,
    group_size: Annotated[int, typer.Option(help="Answers sampled per prompt (G).")] = 4,
    max_completion: AnswerLenOpt = 32,
    temperature: TemperatureOpt = 1.0,
    beta: Annotated[float, typer.Option(help="Weight of the k3 KL to the start (0 = off).")] = 0.0,
    epsilon: Annotated[float, typer.Option(help="Clip range below 1.")] = 0.2,
    epsilon_high: Annotated[
        float | None, typer.Option(help="Clip range above 1 (default: --epsilon).")
    ] = None,
    loss_type: Annotated[str, typer.Option(help="grpo, bnpo, dapo or dr_grpo.")] = "dapo",
    scale_rewards: Annotated[str, typer.Option(help="group, batch or none.")] = "group",
    format_weight: Annotated[
        float, typer.Option(help='Reward for stating "the answer is" (0 = off).')
    ] = 0.0,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 50,
    batch_size: Annotated[int, typer.Option(help="Prompts per step.")] = 4,
    lr: LrOpt = 1e-6,
    seq_len: SeqOpt = 512,
    seed: SeedOpt = 0,
    peft: PeftOpt = None,
) -> None:
    """GRPO with verifiable rewards: G answers per prompt from the current policy, scored
    by the task's exact answers, group-normalised advantages, the clipped surrogate."""
    from lmlab.adapt.grpo import GRPOConfig, align_grpo
    from lmlab.model.adapters import parse_peft

    grpo, cfg, _ = _configs(
        "grpo",
        GRPOConfig,
        dict(
            task=task,
            difficulty=difficulty,
            prompts=prompts,
            heldout=heldout,
            group_size=group_size,
            max_completion=max_completion,
            temperature=temperature,
            beta=beta,
            epsilon_low=epsilon,
            epsilon_high=epsilon if epsilon_high is None else epsilon_high,
            loss_type=loss_type,
            scale_rewards=scale_rewards,
            format_weight=format_weight,
        ),
        dict(batch_size=batch_size, seq_len=seq_len, lr=lr, steps=steps),
    )
    s = align_grpo(model, out, grpo, cfg, seed=seed, peft=parse_peft(peft))
    log(f"grpo: wrote {out / 'model'}; {_heldout(s)}")


@align_app.command("kto")
def kto_cmd(
    model: ModelArg,
    data: Annotated[
        list[Path], typer.Option(help="Feedback JSONL: prompt, completion, label (repeatable).")
    ],
    out: OutOpt,
    beta: Annotated[float, typer.Option(help="Strength of the pull toward the reference.")] = 0.1,
    desirable_weight: Annotated[float, typer.Option(help="Weight of desirable examples.")] = 1.0,
    undesirable_weight: Annotated[
        float, typer.Option(help="Weight of undesirable examples.")
    ] = 1.0,
    heldout: HeldoutOpt = 0.1,
    steps: StepsOpt = None,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    lr: LrOpt = 5e-6,
    seq_len: SeqOpt = 512,
    seed: SeedOpt = 0,
    peft: PeftOpt = None,
) -> None:
    """KTO on unpaired feedback (each completion marked desirable or not), the reference's
    log-probs computed once; writes an ordinary checkpoint to OUT/model."""
    from lmlab.adapt.kto import KTOConfig, align_kto
    from lmlab.model.adapters import parse_peft

    kto, cfg, one_pass = _configs(
        "kto",
        KTOConfig,
        dict(
            beta=beta,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
            heldout=heldout,
        ),
        dict(batch_size=batch_size, seq_len=seq_len, lr=lr, steps=steps),
    )
    summary = align_kto(
        model, list(data), out, kto, cfg, seed=seed, one_pass=one_pass, peft=parse_peft(peft)
    )
    steps_done = summary.get("steps", "?")
    log(f"kto: wrote {out / 'model'} ({steps_done} steps, {summary['pairs']} examples)")


@align_app.command("pairs")
def pairs_cmd(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="The preference JSONL file to write.")],
    task: TaskOpt = "addition",
    prompts: Annotated[int, typer.Option(help="Items to answer.")] = 64,
    k: Annotated[int, typer.Option(help="Answers sampled per item.")] = 4,
    difficulty: DifficultyOpt = 1,
    temperature: TemperatureOpt = 1.0,
    max_new_tokens: AnswerLenOpt = 64,
    reward_model: Annotated[
        str | None, typer.Option(help="Rank by this reward model instead of the verifier.")
    ] = None,
    judge: Annotated[
        str | None, typer.Option(help="Rank by this LLM judge (pairwise, both orders).")
    ] = None,
    seed: SeedOpt = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT if this command wrote it.")
    ] = False,
) -> None:
    """Build preference pairs: k sampled answers per item, ranked by the task's verifier
    (or a reward model, or an LLM judge); the best and the worst become chosen and
    rejected."""
    from lmlab.adapt.pairs import build_pairs

    r = build_pairs(
        model, out, task, prompts, k, difficulty, temperature, max_new_tokens,
        reward_model, judge, seed, overwrite,
    )  # fmt: skip
    log(
        f"pairs: wrote {r['pairs']} pairs to {out} ({r['ties']} of {r['items']} items had no "
        f"preference; scored by {r['scorer']})"
    )


@align_app.command("ppo")
def ppo_cmd(
    model: ModelArg,
    out: OutOpt,
    reward_model: Annotated[
        str | None, typer.Option(help="The reward model (default: the task's verifier).")
    ] = None,
    task: TaskOpt = "addition",
    difficulty: DifficultyOpt = 1,
    prompts: Annotated[int, typer.Option(help="Training items.")] = 256,
    heldout: HeldoutItemsOpt = 32,
    max_completion: AnswerLenOpt = 32,
    temperature: TemperatureOpt = 1.0,
    kl_coef: Annotated[
        float, typer.Option(help="Per-token KL penalty to the start (adaptive: its start).")
    ] = 0.05,
    kl_target: Annotated[
        float | None,
        typer.Option(help="Adaptive KL: the target KL per sequence (nats); default fixed."),
    ] = None,
    kl_horizon: Annotated[
        int, typer.Option(help="Adaptive KL: sequences over which the coefficient adapts.")
    ] = 10_000,
    gamma: Annotated[float, typer.Option(help="Discount.")] = 1.0,
    lam: Annotated[float, typer.Option(help="GAE's lambda.")] = 0.95,
    cliprange: Annotated[float, typer.Option(help="Policy ratio clip.")] = 0.2,
    cliprange_value: Annotated[float, typer.Option(help="Value clip.")] = 0.2,
    vf_coef: Annotated[float, typer.Option(help="Weight of the value loss.")] = 0.1,
    ppo_epochs: Annotated[int, typer.Option(help="Steps that reuse one rollout.")] = 1,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 50,
    batch_size: Annotated[int, typer.Option(help="Prompts per rollout.")] = 8,
    lr: LrOpt = 1e-6,
    seq_len: SeqOpt = 512,
    seed: SeedOpt = 0,
    peft: PeftOpt = None,
) -> None:
    """PPO-RLHF (InstructGPT): sampled answers scored by a reward model (or a verifier), a
    per-token KL penalty, GAE with a value head on the policy, the clipped objective."""
    from lmlab.adapt.ppo import PPOConfig, align_ppo
    from lmlab.model.adapters import parse_peft

    peft_cfg = parse_peft(peft)

    ppo, cfg, _ = _configs(
        "ppo",
        PPOConfig,
        dict(
            task=task,
            difficulty=difficulty,
            prompts=prompts,
            heldout=heldout,
            max_completion=max_completion,
            temperature=temperature,
            reward_model=reward_model,
            kl_coef=kl_coef,
            kl_target=kl_target,
            kl_horizon=kl_horizon,
            gamma=gamma,
            lam=lam,
            cliprange=cliprange,
            cliprange_value=cliprange_value,
            vf_coef=vf_coef,
            ppo_epochs=ppo_epochs,
        ),
        dict(batch_size=batch_size, seq_len=seq_len, lr=lr, steps=steps),
    )
    s = align_ppo(model, out, ppo, cfg, seed=seed, peft=peft_cfg)
    log(f"ppo: wrote {out / 'model'}; {_heldout(s)}")


@app.command("self-instruct")
def self_instruct_cmd(
    model: ModelArg,
    seeds: Annotated[
        Path, typer.Option(help="Seed instructions: JSONL with 'instruction', or lines.")
    ],
    out: Annotated[Path, typer.Option(help="The Alpaca JSONL file to write.")],
    n: Annotated[int, typer.Option(help="New instructions to keep.")] = 100,
    demos: Annotated[int, typer.Option(help="Examples shown per request.")] = 3,
    batch: Annotated[int, typer.Option(help="Requests generated together.")] = 8,
    threshold: Annotated[
        float, typer.Option(help="Reject a task this ROUGE-L-similar to one in the pool.")
    ] = 0.7,
    max_new_tokens: Annotated[int, typer.Option(help="Longest task in tokens.")] = 64,
    temperature: TemperatureOpt = 1.0,
    seed: SeedOpt = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT if this command wrote it.")
    ] = False,
) -> None:
    """Self-instruct: the model writes new tasks from seed tasks, keeps those unlike the
    pool (ROUGE-L), and answers them; the Alpaca JSONL feeds `lmlab sft --data`."""
    from lmlab.adapt.self_instruct import self_instruct

    r = self_instruct(
        model, seeds, out, n, demos, batch, threshold, max_new_tokens, temperature, seed,
        overwrite,
    )  # fmt: skip
    if r["kept"]:
        print(out)
