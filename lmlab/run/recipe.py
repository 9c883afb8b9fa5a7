"""Recipes: one YAML file configures every stage; validated before anything runs.

A recipe may name a `base` (a built-in recipe or another file) and override only what
differs; `--set key.path=value` overrides apply last. Any unknown key, wrong type or
impossible value is reported as one line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from lmlab.adapt.dpo import DPOConfig
from lmlab.adapt.grpo import GRPOConfig
from lmlab.adapt.sft import SFTConfig
from lmlab.config import STRICT, Int, NonNegInt, PosFloat, PosInt
from lmlab.data.pipeline import PipelineConfig
from lmlab.errors import UsageError
from lmlab.eval.synthetic import check_task
from lmlab.model.adapters import PeftConfig
from lmlab.model.config import ModelConfig
from lmlab.model.presets import SIZE_KEYS, resolve_fields
from lmlab.tokenizer.train import MIN_VOCAB
from lmlab.train.loop import TrainConfig
from lmlab.train.objectives import check_objective
from lmlab.train.pretrain import PretrainConfig


@dataclass
class TokenizerConfig:
    __pydantic_config__ = STRICT

    kind: Literal["bpe", "wordpiece", "unigram"] = "bpe"  # lmlab.tokenizer.train.KINDS
    vocab_size: PosInt = 4096
    min_frequency: PosInt = 2  # bpe and wordpiece: a merge must occur this often

    def __post_init__(self) -> None:
        least = MIN_VOCAB[self.kind]
        if self.vocab_size < least:
            raise UsageError(
                f"vocab_size={self.vocab_size} is too small; byte-level {self.kind} needs "
                f"at least {least} (its byte pieces + special tokens + learned pieces)"
            )


@dataclass
class EvalConfig:
    __pydantic_config__ = STRICT

    val_tokens: PosInt = 100_000  # tokens of the validation split scored for loss/ppl/bpb
    questions: PosInt = 100  # held-out questions asked of the base and the SFT model
    shots: NonNegInt = 3  # few-shot examples in the base model's prompt
    max_new_tokens: PosInt = 48
    # evaluation tasks for both models (`lmlab eval --tasks` names: a YAML file,
    # synthetic:TASK[:DIFFICULTY], code[:FILE]); results per model under eval/tasks/
    tasks: list[str] = field(default_factory=list)
    task_limit: PosInt = 50  # items per task


@dataclass
class SFTStage(SFTConfig):
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            lr=3e-4, warmup_steps=20, max_minutes=2.0, eval_every=50, checkpoint_every=50
        )
    )
    # instruction sets (chat `messages`, prompt/completion, Alpaca; `FILE` or `FILE:WEIGHT`
    # as `lmlab sft --data` takes them, relative to the working directory) tuned on instead
    # of the docstring questions mined from the corpus
    data: list[str] = field(default_factory=list)
    packing: bool = True  # several examples per row, attention and loss kept inside each
    # train an adapter only (LoRA, DoRA, IA³; docs/peft.md); None: every weight
    peft: PeftConfig | None = None


# GRPO's task keys: one task for every method, set at `align.*` (GRPO's own name on the right)
_GRPO_TASK = {
    "task": "task",
    "difficulty": "difficulty",
    "prompts": "prompts",
    "heldout": "heldout",
    "temperature": "temperature",
    "max_new_tokens": "max_completion",
}


@dataclass
class AlignStage:
    """Alignment after SFT on a task with exact answers: DPO on pairs that the SFT model's
    own samples make (the verifier picks the best and worst of `k`), or GRPO on the task."""

    __pydantic_config__ = STRICT

    method: Literal["none", "dpo", "grpo"] = "none"
    # dpo: preference files (TRL's prompt/chosen/rejected, relative to the working
    # directory) trained on instead of pairs built from the SFT model's answers
    data: list[str] = field(default_factory=list)
    task: str = "addition"  # a generated reasoning task (lmlab.eval.synthetic)
    difficulty: PosInt = 1
    prompts: PosInt = 128  # training items of the task's train split
    heldout: NonNegInt = 32  # test-split items scored greedily before and after
    k: PosInt = 4  # dpo: answers sampled per prompt
    temperature: PosFloat = 1.0  # sampling of the pairs' answers and of GRPO's groups
    max_new_tokens: PosInt = 32
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # its loss keys; the task is above
    peft: PeftConfig | None = None  # train an adapter only (after merging SFT's, if any)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            batch_size=4,
            seq_len=128,
            lr=5e-6,
            warmup_steps=0,
            weight_decay=0.0,
            max_minutes=3.0,
            eval_every=25,
            checkpoint_every=25,
            log_every=1,
        )
    )

    def __post_init__(self) -> None:
        try:
            check_task(self.task, self.difficulty)
        except UsageError as e:
            raise UsageError(f"align.task: {str(e).removeprefix('synthetic: ')}") from None
        if self.k < 2:
            raise UsageError("align.k: at least 2 answers per prompt make a pair")
        default = GRPOConfig()
        for ours, theirs in _GRPO_TASK.items():
            if getattr(self.grpo, theirs) != getattr(default, theirs):
                raise UsageError(
                    f"align.grpo.{theirs}: set align.{ours} instead (one task for every method)"
                )

    def grpo_config(self) -> GRPOConfig:
        """GRPO's whole config: its loss keys with the task keys of `align`."""
        return dataclasses.replace(
            self.grpo, **{theirs: getattr(self, ours) for ours, theirs in _GRPO_TASK.items()}
        )


class Recipe(BaseModel):
    """The whole pipeline's configuration (see docs/recipes.md for every key)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "tiny"
    seed: Int = 1337
    threads: PosInt | None = None  # torch CPU threads; None = all cores
    # a real model to start from (a store name, a checkpoint or Hugging Face directory, a
    # GGUF file): the tokenizer stage takes its tokenizer, pre-training copies it, and SFT
    # and evaluation run on it; `tokenizer:`, `model:` and `pretrain:` are then unused
    base_model: str | None = None
    data: PipelineConfig = Field(
        default_factory=lambda: PipelineConfig(profile="code", val_fraction=0.05)
    )
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=lambda: PretrainConfig(max_minutes=8.0))
    sft: SFTStage = Field(default_factory=SFTStage)
    align: AlignStage = Field(default_factory=AlignStage)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    # name -> model overrides merged onto `model:`; non-empty makes the run a controlled
    # comparison (lmlab.run.compare): same data, tokens and seed for every variant
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # the resolved model of every variant, computed while the raw `model:` mapping (which a
    # variant's `preset` or `size` re-resolves) is still at hand
    _variant_models: dict[str, ModelConfig] = PrivateAttr(default_factory=dict)

    @field_validator("model", mode="before")
    @classmethod
    def _model_preset(cls, v: Any) -> Any:
        """`preset`, `size`, `layers`, `width`, `heads` resolve to plain model fields."""
        return resolve_fields(v) if isinstance(v, dict) else v

    @field_validator("sft", "align", mode="before")
    @classmethod
    def _stage_train_defaults(cls, v: Any, info: Any) -> Any:
        """A stage's `train:` keys override the stage's own training defaults (a gentle
        learning rate, no warm-up), not TrainConfig's pre-training ones; a budget given
        (steps, tokens or minutes) replaces the default budget whole."""
        if isinstance(v, dict) and isinstance(v.get("train"), dict):
            own = dataclasses.asdict(
                {"sft": SFTStage, "align": AlignStage}[info.field_name]().train
            )
            budget = ("max_steps", "max_tokens", "max_minutes")
            if any(k in v["train"] for k in budget):
                own = {k: x for k, x in own.items() if k not in budget}
            v = {**v, "train": {**own, **v["train"]}}
        return v

    @field_validator("variants", mode="before")
    @classmethod
    def _empty_variants(cls, v: Any) -> Any:
        """`variants:` or `baseline:` with nothing under it means no overrides."""
        if v is None:
            return {}
        return {k: {} if o is None else o for k, o in v.items()} if isinstance(v, dict) else v

    @model_validator(mode="wrap")
    @classmethod
    def _resolve_variants(cls, data: Any, handler: Any) -> Recipe:
        """Validate every variant at load, reporting errors at `variants.<name>.<key>`."""
        models = variant_models(data) if isinstance(data, dict) else {}
        recipe = handler(data)
        recipe._variant_models = models
        return recipe

    @model_validator(mode="after")
    def _fits_across_stages(self) -> Recipe:
        """Constraints between stages, checked here so that no stage runs (and writes)
        before a later one would fail on them."""
        if self.base_model is not None:
            if not self.base_model.strip():
                raise ValueError("base_model: empty; give a store name or a model path")
            if self.variants:
                raise ValueError(
                    "base_model: variants compare architectures trained here from scratch; "
                    "a base model has its own"
                )
            return self  # the model's own limits are checked when it is loaded
        models = {"model": self.model}
        models.update({f"variants.{k}": m for k, m in self._variant_models.items()})
        for where, m in models.items():
            span_only = m.family == "encoder_decoder"  # windows become encoder/decoder halves
            if self.pretrain.seq_len > m.max_seq_len and not span_only:
                raise ValueError(
                    f"pretrain.seq_len: {self.pretrain.seq_len} exceeds {where}.max_seq_len="
                    f"{m.max_seq_len}; lower one or raise the other"
                )
            try:
                check_objective(self.pretrain.objective, m.family)
            except UsageError as e:
                raise ValueError(f"{e} (the family of {where})") from None
        if not self.variants and self.sft.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"sft.train.seq_len: {self.sft.train.seq_len} exceeds model.max_seq_len="
                f"{self.model.max_seq_len}"
            )
        return self

    def variant_models(self) -> dict[str, ModelConfig]:
        """Each variant's model (vocab_size still the default: the tokenizer sets it)."""
        return dict(self._variant_models)

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


VARIANT_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_MODEL = TypeAdapter(ModelConfig)
# A variant's key replaces the recipe's own key for the same quantity in either spelling
# (`n_layers: 6` in a variant wins over `layers: 4` in `model:`, and the other way round).
_SAME = {**SIZE_KEYS, **{v: k for k, v in SIZE_KEYS.items()}}


def merge_variant(model: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The raw `model:` mapping of one variant: the recipe's, with the variant's keys on top."""
    out = {k: v for k, v in model.items() if _SAME.get(k) not in overrides}
    return {**out, **overrides}


def variant_models(raw: dict[str, Any]) -> dict[str, ModelConfig]:
    """Resolve and validate the `variants` of a raw recipe mapping.

    Raises a ValidationError located at `variants.<name>[.<key>]`, so the one-line error
    names the variant and its key like any other recipe key."""
    variants = raw.get("variants")
    model = raw.get("model") or {}
    if not isinstance(variants, dict) or not isinstance(model, dict):
        return {}  # the field validators report the wrong type
    out = {}
    for name, overrides in variants.items():
        loc: tuple = ("variants", str(name))
        try:
            if not VARIANT_NAME.fullmatch(str(name)):
                raise ValueError("a variant name uses only letters, digits, '_', '.', '-'")
            if overrides is None:
                overrides = {}  # `baseline:` with nothing under it: the recipe's own model
            if not isinstance(overrides, dict):
                raise ValueError("expected a mapping of model keys (or nothing)")
            if "vocab_size" in overrides:
                loc += ("vocab_size",)
                raise ValueError("set by the tokenizer; set tokenizer.vocab_size instead")
            out[str(name)] = _MODEL.validate_python(resolve_fields(merge_variant(model, overrides)))
        except ValidationError as e:
            raise ValidationError.from_exception_data(
                "Recipe",
                [
                    InitErrorDetails(
                        type=err["type"],
                        loc=(*loc, *err["loc"]),
                        input=err["input"],
                        ctx=err.get("ctx", {}),
                    )
                    for err in e.errors()
                ],
            ) from None
        except ValueError as e:
            raise ValidationError.from_exception_data(
                "Recipe",
                [InitErrorDetails(type="value_error", loc=loc, input=overrides, ctx={"error": e})],
            ) from None
    return out


def builtin_recipes() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("lmlab.recipes").iterdir() if p.name.endswith(".yaml")
    )


def _read_yaml(ref: str) -> tuple[dict, str]:
    """Raw mapping of a built-in recipe name or a YAML path, with `base` merged in."""
    path = Path(ref)
    if ref in builtin_recipes():
        text = resources.files("lmlab.recipes").joinpath(f"{ref}.yaml").read_text()
        where = f"recipe {ref}"
    elif path.is_file():
        text = path.read_text(encoding="utf-8")
        where = str(path)
    else:
        known = ", ".join(builtin_recipes())
        raise UsageError(f"recipe {ref!r}: no such file or built-in recipe (built-in: {known})")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UsageError(f"{where}:{line} invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: a recipe must be a mapping of keys, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is not None:
        base_raw, _ = _read_yaml(str(base))
        raw = deep_merge(base_raw, raw)
    return raw, where


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UsageError(f"--set {item!r}: expected key.path=value, e.g. pretrain.lr=3e-4")
    key, value = item.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def load_recipe(ref: str = "tiny", overrides: list[str] | None = None) -> Recipe:
    raw, where = _read_yaml(ref)
    for item in overrides or []:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            nxt = node.get(k)
            if not isinstance(nxt, dict):
                nxt = node[k] = {}
            node = nxt
        node[keys[-1]] = value
    if overrides:
        where += " with --set overrides"
    if "vocab_size" in (raw.get("model") or {}):
        raise UsageError(
            f"{where}: model.vocab_size is set by the tokenizer; set tokenizer.vocab_size instead"
        )
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise UsageError(f"{where}: {describe_error(e)}") from None


def describe_error(e: ValidationError) -> str:
    """One line for the first problem: the key path, what was given and what is allowed."""
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"] if not str(x).startswith("function-")]
    key = ".".join(loc)
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        variant = loc[0] == "variants" and len(loc) == 3
        allowed = (
            sorted({*allowed_keys(Recipe, ["model"]), "size", *SIZE_KEYS} - {"vocab_size"})
            if variant
            else allowed_keys(Recipe, loc[:-1])
        )
        return f"unknown key {key!r} (allowed: {', '.join(allowed)})"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    given = err.get("input")
    shown = "" if isinstance(given, dict) or err["type"] == "value_error" else f" (got {given!r})"
    if not key or msg.startswith((f"{key}.", f"{key}:")):  # the message names the key
        return msg
    return f"{key}: {msg}{shown}"


def allowed_keys(cls: Any, path: list[str]) -> list[str]:
    """The keys a recipe accepts at `path`, read off the config classes themselves."""
    for part in path:
        hints = _hints(cls)
        if part not in hints:
            return []
        cls = _unwrap(hints[part])
    return sorted(_hints(cls))


def _hints(cls: Any) -> dict[str, Any]:
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return {k: f.annotation for k, f in cls.model_fields.items()}
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return {}


def _unwrap(t: Any) -> Any:
    for arg in typing.get_args(t) or ():
        if dataclasses.is_dataclass(arg) or (isinstance(arg, type) and issubclass(arg, BaseModel)):
            return arg
    return t


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML that `lmlab run FILE` accepts back."""
    resolved = recipe.resolved()
    model = resolved["model"]
    model.pop("vocab_size")  # set by the tokenizer stage, not by the recipe
    if recipe.variants:  # keep derived sizes derived, so `activation: gelu` re-derives them
        for k in ("ffn_hidden", "head_dim", "n_kv_heads", "n_decoder_layers"):
            rest = {f: v for f, v in model.items() if f != k}
            if ModelConfig.from_dict(rest) == recipe.model:
                model.pop(k)
    return yaml.safe_dump(resolved, sort_keys=False)
