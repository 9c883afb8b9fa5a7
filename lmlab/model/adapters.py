"""Parameter-efficient adapters on an lmlab model: LoRA (with rsLoRA scaling), DoRA and
IA³ (Zhao et al. §5.3), in PEFT's file layout.

An adapted linear layer stays an `nn.Linear` with its own `weight` and `bias` (the base
model's tensors, shared, frozen) and gains the adapter's tensors beside them under PEFT's
names (`lora_A`, `lora_B`, `lora_magnitude_vector`, `ia3_l`). So the base model's state
dict keys do not move, every verb that calls the layer sees the adapted output, and the
adapter's tensors map one to one onto PEFT's (`base_model.model.` + the Hugging Face
module name + the tensor's name): `peft.PeftModel.from_pretrained` loads what lmlab saves
on the Hugging Face export of the base, and lmlab loads what PEFT saved.

The forward passes follow PEFT's exactly:
- LoRA: y = W x + b + (B A dropout(x)) · s, s = α / r (rsLoRA: α / √r); A is
  Kaiming-uniform, B zero, so a new adapter leaves the model unchanged.
- DoRA: the LoRA update's direction with a learned magnitude m per output row:
  y = W x + b + (m / ‖W + s B A‖ − 1) · W x + (m / ‖W + s B A‖) · s B A x, the norm taken
  per row and detached (as in the paper's §4.3), m initialised to ‖W‖.
- IA³: a learned vector l scales the layer's output (attention keys and values), or its
  input (the feed-forward's down projection); l starts at 1.
- Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021) add no layer:
  a `virtual_prompt` module puts n virtual tokens before every sequence, as soft input
  embeddings run through the model, or as keys/values for every layer (optionally
  produced by an MLP during training). They reach the model through its KV-cache seam
  (`Transformer.forward`, `lmlab.infer.engine.Runner`), and are saved as PEFT saves them:
  one `prompt_embeddings` tensor.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from lmlab.config import STRICT, Fraction, PosFloat, PosInt
from lmlab.errors import CheckpointError, UsageError
from lmlab.model.quant import QuantLinear
from lmlab.model.transformer import ConcatCache

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
METHODS = ("lora", "dora", "ia3", "bottleneck", "prompt", "prefix")
VIRTUAL = ("prompt", "prefix")  # virtual tokens, not layers
PROMPT_EMBEDDINGS = "prompt_embeddings"  # PEFT's one tensor of a prompt-learning adapter
PREFIX_ENCODER = "lmlab_prefix_encoder."  # the MLP of prefix tuning, kept to resume training
BOTTLENECK_TYPE = "LMLAB_BOTTLENECK"  # lmlab's own `peft_type`: PEFT has no such adapter


@dataclass
class PeftConfig:
    """Which adapter, where, and its size. `target_modules`: module names (a layer is
    adapted when its dotted name ends with one, as PEFT matches a list), one regular
    expression that must match the whole name (as PEFT matches a string), or
    "all-linear" (every linear layer but the output head)."""

    __pydantic_config__ = STRICT

    method: Literal["lora", "dora", "ia3", "bottleneck", "prompt", "prefix"] = "lora"
    r: PosInt = 8
    alpha: PosFloat = 16.0
    dropout: Fraction = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    rslora: bool = False  # scale by alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r
    # IA³: the targets whose input (not output) is scaled (PEFT's `feedforward_modules`)
    feedforward_modules: list[str] = field(default_factory=lambda: ["down_proj"])
    # prompt and prefix tuning: how many virtual tokens; prompt tuning's soft prompt may
    # start as the embeddings of a text (repeated or cut to length), else N(0, 1) as PEFT
    num_virtual_tokens: PosInt = 20
    init_text: str | None = None
    # prefix tuning: train the prefix through an MLP (Li & Liang's reparameterisation)
    prefix_projection: bool = False
    encoder_hidden_size: PosInt | None = None  # the MLP's width (None: the keys' width)
    # set by `add_adapters`: SEQ_CLS when the model has a reward head (trained with it)
    task_type: Literal["CAUSAL_LM", "SEQ_CLS"] = "CAUSAL_LM"

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def parse_peft(spec: str | dict | PeftConfig | None) -> PeftConfig | None:
    """A PEFT config from a mapping (a recipe's `peft:` block) or the command line's
    `METHOD[:key=value,...]` (list values joined by `|`; `target_modules=re:PATTERN` for
    a regular expression), e.g. `lora:r=16,alpha=32,target_modules=q_proj|k_proj|v_proj`."""
    if spec is None or isinstance(spec, PeftConfig):
        return spec
    if isinstance(spec, str):
        method, _, rest = spec.partition(":")
        raw: dict = {"method": method.strip()}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise UsageError(f"--peft {spec}: expected key=value, got {item!r}")
            key = key.strip()
            if key == "target_modules" and (value.startswith("re:") or value == "all-linear"):
                raw[key] = value.removeprefix("re:")  # one regular expression, or PEFT's
            elif key in ("target_modules", "feedforward_modules"):
                raw[key] = [v for v in value.split("|") if v]
            elif key in ("rslora", "prefix_projection"):
                raw[key] = value.strip().lower() in ("1", "true", "yes")
            elif key == "init_text":
                raw[key] = value
            else:
                try:
                    ints = ("r", "num_virtual_tokens", "encoder_hidden_size")
                    raw[key] = int(value) if key in ints else float(value)
                except ValueError:
                    raise UsageError(f"--peft {spec}: {key} must be a number") from None
        where = f"--peft {spec}"
    else:
        raw, where = dict(spec), "peft"
    if raw.get("method") == "ia3" and "target_modules" not in raw:
        raw["target_modules"] = ["k_proj", "v_proj", "down_proj"]  # PEFT's Llama defaults
    if raw.get("method") == "bottleneck" and "target_modules" not in raw:
        raw["target_modules"] = ["o_proj", "down_proj"]  # Houlsby: after attention, after FFN
    if raw.get("method") in VIRTUAL:
        raw.setdefault("target_modules", [])
    try:
        return TypeAdapter(PeftConfig).validate_python(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"]) or "peft"
        raise UsageError(f"{where}: {key}: {err['msg']}") from None


# --- the adapted layers -----------------------------------------------------------------------


class LoRALinear(nn.Linear):
    """A linear layer with a LoRA (or DoRA) update beside its frozen weight."""

    def __init__(
        self, base: nn.Linear, cfg: PeftConfig, generator: torch.Generator | None = None
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the base model's own tensors
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, cfg.r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(cfg.r, self.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = cfg.scaling
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.dora = cfg.method == "dora"
        self.lora_magnitude_vector = (
            nn.Parameter(torch.linalg.norm(self.weight.detach().float(), dim=1).to(dt))
            if self.dora
            else None
        )

    def delta(self) -> torch.Tensor:
        """s · B A, the update as one matrix."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def _dora_scale(self) -> torch.Tensor:
        norm = torch.linalg.norm(self.weight + self.delta().detach(), dim=1).detach()
        return (self.lora_magnitude_vector / norm).view(1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.dora:
            return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        # PEFT's DoRA: with dropout active in training, the base part is recomputed on
        # the dropped-out input; otherwise the base output (less its bias) is reused
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            x = self.lora_dropout(x)
            base = F.linear(x, self.weight)
        else:
            base = y if self.bias is None else y - self.bias
        scale = self._dora_scale()
        return y + (scale - 1) * base + scale * self.lora_B(self.lora_A(x)) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        w = self.weight + self.delta()
        if self.dora:
            w = (self.lora_magnitude_vector / torch.linalg.norm(w, dim=1)).view(-1, 1) * w
        return w


class IA3Linear(nn.Linear):
    """A linear layer whose output (or, for a feed-forward layer, input) is scaled by a
    learned vector."""

    def __init__(self, base: nn.Linear, feedforward: bool) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return F.linear(x * self.ia3_l.flatten().to(x.dtype), self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) * self.ia3_l.flatten().to(x.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        # l is [1, in] (feed-forward: the columns) or [out, 1] (the rows): one broadcast
        return self.weight * self.ia3_l.to(self.weight.dtype)

    @torch.no_grad()
    def merged_bias(self) -> torch.Tensor | None:
        if self.bias is None or self.feedforward:
            return self.bias
        return self.bias * self.ia3_l.flatten().to(self.bias.dtype)


class BottleneckLinear(nn.Linear):
    """Houlsby et al. 2019's adapter after a sublayer's output projection: y ← y +
    up(GELU(down(y))), a bottleneck of width r with its own residual; `up` starts at zero,
    so a new adapter changes nothing. Placed on `o_proj` and `down_proj` it sits after the
    attention and after the feed-forward block, before their residual additions. It is
    not linear, so it cannot be merged into the weight."""

    def __init__(self, base: nn.Linear, cfg: PeftConfig, generator=None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        dev, dt = base.weight.device, base.weight.dtype
        self.adapter_down = nn.Linear(self.out_features, cfg.r, device=dev, dtype=dt)
        self.adapter_up = nn.Linear(cfg.r, self.out_features, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.adapter_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + self.adapter_up(self.adapter_dropout(F.gelu(self.adapter_down(y))))


# --- virtual tokens: prompt and prefix tuning --------------------------------------------------


class VirtualPrompt(nn.Module):
    """n virtual tokens before every sequence. Prompt tuning: `embedding` [n, d] is a soft
    prompt that runs through the model like token embeddings. Prefix tuning: `embedding`
    [n, layers·2·kv] holds every layer's keys and values (PEFT's layout: per token, layer
    i's keys then its values, each kv_heads × head_dim), or, with `prefix_projection`,
    [n, kv] that the MLP `transform` maps to them (Li & Liang's reparameterisation; only
    its output is needed after training). `forward()` is that table."""

    def __init__(self, model: nn.Module, cfg: PeftConfig, init: torch.Tensor | None, gen) -> None:
        super().__init__()
        mc = model.cfg
        self.kind, self.n = cfg.method, cfg.num_virtual_tokens
        self.layers, self.kv_heads, self.head_dim = mc.n_layers, mc.n_kv_heads, mc.head_dim
        kv = mc.n_kv_heads * mc.head_dim
        emb = model.embed_tokens.weight
        dev, dt = emb.device, emb.dtype
        width = mc.d_model if cfg.method == "prompt" else kv
        if cfg.method == "prefix" and not cfg.prefix_projection:
            width = self.layers * 2 * kv
        self.embedding = nn.Embedding(self.n, width, device=dev, dtype=dt)
        if dev.type != "meta":
            nn.init.normal_(self.embedding.weight, generator=gen)  # nn.Embedding's N(0, 1)
        if init is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init)
        if cfg.method == "prefix" and cfg.prefix_projection:
            hidden = cfg.encoder_hidden_size or kv
            self.transform = nn.Sequential(
                nn.Linear(kv, hidden, device=dev, dtype=dt),
                nn.Tanh(),
                nn.Linear(hidden, self.layers * 2 * kv, device=dev, dtype=dt),
            )
            if dev.type != "meta":  # nn.Linear's own initialisation, drawn from `gen`
                for lin in (self.transform[0], self.transform[2]):
                    nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=gen)
                    bound = 1 / math.sqrt(lin.in_features)
                    nn.init.uniform_(lin.bias, -bound, bound, generator=gen)

    def forward(self) -> torch.Tensor:
        w = self.embedding.weight
        return self.transform(w) if hasattr(self, "transform") else w

    def cache(self, model: nn.Module) -> ConcatCache:
        """The virtual tokens' keys/values for every layer, computed once for a batch of
        one (the cache expands them to the batch), with gradients to the adapter."""
        cc = ConcatCache(self.layers)
        table = self()
        if self.kind == "prompt":
            dt = model.embed_tokens.weight.dtype
            model(None, cache=cc, inputs_embeds=table[None].to(dt), hidden=True, logits_to_keep=1)
            return cc
        kv = table.view(self.n, self.layers * 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        cc.k = [kv[2 * i][None] for i in range(self.layers)]
        cc.v = [kv[2 * i + 1][None] for i in range(self.layers)]
        cc.pos = self.n
        return cc

    @torch.no_grad()
    def fill(self, model: nn.Module, cache) -> None:
        """Write the virtual tokens into a fresh generation cache (slots 0..n-1)."""
        cc = self.cache(model)
        for i in range(self.layers):
            cache.update(i, cc.k[i], cc.v[i])
        cache.advance(self.n)

    def widen_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """A padding mask [B, S] or a bool mask [B, 1, T, S] with the virtual tokens'
        columns in front, visible to every token."""
        if mask is None:
            return None
        if mask.dim() == 2:
            return F.pad(mask, (self.n, 0), value=1)
        return F.pad(mask, (self.n, 0), value=True)


def virtual_tokens(model: nn.Module) -> int:
    """How many virtual tokens the model puts before a sequence (0 without an adapter that
    adds them): what a generation cache must hold beyond the prompt."""
    vp = model._modules.get("virtual_prompt")
    return vp.n if vp is not None else 0


@contextlib.contextmanager
def adapter_disabled(model: nn.Module):
    """The base model's outputs while inside (a reference before training, as TRL takes it
    from a PEFT model). Every layer adapter starts as the identity, so only virtual tokens
    need setting aside; they are put back on leaving."""
    vp = model._modules.pop("virtual_prompt", None)
    try:
        yield model
    finally:
        if vp is not None:
            model._modules["virtual_prompt"] = vp


def reference_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` as its base computes (no virtual tokens): a reference
    policy for the alignment objectives."""
    with adapter_disabled(model):
        ref = copy.deepcopy(model)
    return ref.eval().requires_grad_(False)


# --- adapters on a quantized base (QLoRA) --------------------------------------------------------


class _FrozenQuantized(torch.autograd.Function):
    """A quantized layer's output with a gradient for its input only: backward multiplies
    by the layer's weight dequantized again, so no float copy of it is kept between the
    forward and the backward (QLoRA's memory saving; the int8 kernel has no backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mod: nn.Module) -> torch.Tensor:
        ctx.mod = mod
        with torch.no_grad():
            return mod.quantized_forward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.mod.dequantized().to(grad.dtype)
        return grad @ w, None


class QuantFrozen(nn.Module):
    """Mixed into the class of every quantized linear layer of a model being adapted: a
    gradient that passes through it (to an adapter before it) is computed with the weight
    dequantized again, so no layer keeps a float copy of its weight for the backward."""

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)  # the quantized class's own forward

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenQuantized.apply(x, self)
        return self.quantized_forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x)


class QuantAdapted(QuantFrozen):
    """Mixed into a quantized linear layer's own class (its tensors keep their names, the
    adapter's are added beside them): LoRA or IA³ on the frozen quantized weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "ia3_l"):
            ia3 = self.ia3_l.flatten().to(x.dtype)
            if self.feedforward:
                return self.base_forward(x * ia3)
            return self.base_forward(x) * ia3
        y = self.base_forward(x)
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        w = self.dequantized().float()
        if hasattr(self, "ia3_l"):
            return w * self.ia3_l.float()
        return w + self.scaling * (self.lora_B.weight @ self.lora_A.weight).float()

    @torch.no_grad()
    def merged_bias(self) -> torch.Tensor | None:
        if self.bias is None or not hasattr(self, "ia3_l") or self.feedforward:
            return self.bias
        return self.bias * self.ia3_l.flatten().to(self.bias.dtype)


_QUANT_CLASSES: dict[tuple[type, type], type] = {}


def _mix(mod: nn.Module, mixin: type) -> None:
    """Give `mod` its class with `mixin` in front (one class per pair, made once)."""
    cls = type(mod)
    if (mixin, cls) not in _QUANT_CLASSES:
        name = f"{mixin.__name__.removeprefix('Quant')}{cls.__name__}"
        _QUANT_CLASSES[mixin, cls] = type(name, (mixin, cls), {})
    mod.__class__ = _QUANT_CLASSES[mixin, cls]


def _adapt_quantized(mod: nn.Module, cfg: PeftConfig, feedforward: bool, generator) -> nn.Module:
    """`mod` (a quantized linear layer) with a LoRA or IA³ adapter, in place."""
    if cfg.method in ("dora", "bottleneck"):
        raise UsageError(
            f"peft: {cfg.method} on a quantized base is not supported (LoRA and IA³ are)"
        )
    if not hasattr(mod, "dequantized"):
        raise UsageError(f"peft: a {type(mod).__name__} layer cannot be adapted")
    _mix(mod, QuantAdapted)
    dev = mod.bias.device if mod.bias is not None else next(mod.buffers()).device
    if cfg.method == "ia3":
        mod.feedforward = feedforward
        shape = (1, mod.in_features) if feedforward else (mod.out_features, 1)
        mod.ia3_l = nn.Parameter(torch.ones(shape, device=dev))
        return mod
    mod.lora_A = nn.Linear(mod.in_features, cfg.r, bias=False, device=dev)
    mod.lora_B = nn.Linear(cfg.r, mod.out_features, bias=False, device=dev)
    nn.init.kaiming_uniform_(mod.lora_A.weight, a=math.sqrt(5), generator=generator)
    nn.init.zeros_(mod.lora_B.weight)
    mod.scaling = cfg.scaling
    mod.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
    return mod


ADAPTED = (LoRALinear, IA3Linear, BottleneckLinear, QuantAdapted)


# --- adding, counting, merging -----------------------------------------------------------------


def _matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: "all-linear", a regular expression matching the whole name (lmlab's
    or the Hugging Face export's, `model.` in front), or names the module's ends with."""
    if targets == "all-linear":
        return True
    names = (name, f"model.{name}")
    if isinstance(targets, str):
        return any(re.fullmatch(targets, n) for n in names)
    return any(n == t or n.endswith(f".{t}") for n in names for t in targets)


def targets_of(model: nn.Module, cfg: PeftConfig) -> list[str]:
    """The linear layers `cfg` adapts (never the output head nor a reward head)."""
    heads = ("lm_head", "score")
    return [
        n
        for n, m in model.named_modules()
        if (type(m) is nn.Linear or isinstance(m, QuantLinear))
        and n not in heads
        and _matches(n, cfg.target_modules)
    ]


def _add_virtual(model: nn.Module, cfg: PeftConfig, init_ids: list[int] | None, seed: int):
    family = model.cfg.family
    if family != "decoder":
        raise UsageError(f"peft: {cfg.method} tuning needs a causal decoder (not {family!r})")
    init = None
    if cfg.method == "prompt" and cfg.init_text is not None:
        if not init_ids:
            raise UsageError("peft: init_text needs the model's tokenizer (and a non-empty text)")
        ids = init_ids * math.ceil(cfg.num_virtual_tokens / len(init_ids))
        init = model.embed_tokens.weight.detach()[torch.tensor(ids[: cfg.num_virtual_tokens])]
    dev = model.embed_tokens.weight.device
    gen = None if dev.type == "meta" else torch.Generator(dev).manual_seed(seed * 1_000_003)
    model.virtual_prompt = VirtualPrompt(model, cfg, init, gen)


def add_adapters(
    model: nn.Module,
    cfg: PeftConfig,
    base: str | None = None,
    seed: int = 0,
    init_ids: list[int] | None = None,
) -> nn.Module:
    """Adapt `model` in place: its targets get fresh adapters (or it gets virtual tokens),
    every other parameter is frozen (a reward head, when there is one, stays trainable:
    it is new). `base` is what the adapter file names as its base model. The
    initialisation is seeded (`seed`, and the layer's place), so two runs start from the
    same adapter; `init_ids` are `cfg.init_text`'s tokens. Returns the model."""
    if getattr(model, "peft_config", None) is not None:
        raise UsageError("the model already has an adapter; merge it first")
    if hasattr(model, "score"):
        cfg = replace(cfg, task_type="SEQ_CLS")
    if cfg.method in VIRTUAL:
        for p in model.parameters():
            p.requires_grad_(False)
        _add_virtual(model, cfg, init_ids, seed)
        return _mark_adapted(model, cfg, base)
    names = targets_of(model, cfg)
    if not names:
        raise UsageError(
            f"peft: target_modules {cfg.target_modules!r} match no linear layer of the model "
            "(names such as q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for i, name in enumerate(names):
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        old = getattr(holder, child)
        feedforward = _matches(name, cfg.feedforward_modules)
        dev = next(iter(old.state_dict().values())).device
        gen = None if dev.type == "meta" else torch.Generator(dev)  # meta: nothing drawn
        gen = gen and gen.manual_seed(seed * 1_000_003 + i)
        if isinstance(old, QuantLinear):  # QLoRA: the quantized weight stays as it is
            new = _adapt_quantized(old, cfg, feedforward, gen)
        elif cfg.method == "bottleneck":
            new = BottleneckLinear(old, cfg, gen)
        elif cfg.method == "ia3":
            new = IA3Linear(old, feedforward)
        else:
            new = LoRALinear(old, cfg, gen)
        setattr(holder, child, new)
    return _mark_adapted(model, cfg, base)


def _mark_adapted(model: nn.Module, cfg: PeftConfig, base: str | None) -> nn.Module:
    for mod in model.modules():  # QLoRA: no quantized layer keeps a float weight for backward
        if isinstance(mod, QuantLinear) and not isinstance(mod, QuantFrozen):
            _mix(mod, QuantFrozen)
    score = getattr(model, "score", None)
    if isinstance(score, nn.Module):
        score.requires_grad_(True)
    model.peft_config = cfg
    model.peft_base = base
    # what `save_checkpoint` writes for an adapted model: the adapter alone
    model.save_adapter_files = functools.partial(save_adapter, model)
    return model


def adapter_names(model: nn.Module) -> list[str]:
    """State-dict keys of the adapter's own tensors (and a reward head's)."""
    if getattr(model, "peft_config", None) is None:
        return []
    keep = (
        "lora_A.",
        "lora_B.",
        "lora_magnitude_vector",
        "ia3_l",
        "adapter_down.",
        "adapter_up.",
        "virtual_prompt.",
    )
    return [
        k
        for k in model.state_dict()
        if any(s in k for s in keep) or (k.startswith("score.") and hasattr(model, "score"))
    ]


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _replace_with_linear(model: nn.Module, name: str, w: torch.Tensor, bias) -> None:
    """Put a plain `nn.Linear` holding `w` (and `bias`) where module `name` was."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    lin.weight.copy_(w)
    if bias is not None:
        lin.bias.copy_(bias)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, lin)


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight and put plain `nn.Linear` layers back:
    the model becomes an ordinary one (what `lmlab adapt merge` saves). A quantized base
    is dequantized whole, adapted layers or not (`lmlab adapt merge --quantize` quantizes
    the result again). A bottleneck adapter is not linear and is refused."""
    if any(isinstance(m, BottleneckLinear) for m in model.modules()):
        raise UsageError("a bottleneck adapter is not linear: it cannot be merged into weights")
    if virtual_tokens(model):
        raise UsageError(
            f"a {model.peft_config.method}-tuning adapter adds virtual tokens, not weights: it "
            "cannot be merged (use BASE + ADAPTER, the adapter directory, as the model)"
        )
    for name, mod in list(model.named_modules()):
        if isinstance(mod, ADAPTED):  # on a quantized layer: dequantized, in float
            bias = mod.merged_bias() if hasattr(mod, "merged_bias") else mod.bias
            _replace_with_linear(model, name, mod.merged_weight(), bias)
        elif isinstance(mod, QuantLinear):  # the rest of a quantized base: in float too
            _replace_with_linear(model, name, mod.dequantized().float(), mod.bias)
    if getattr(model, "quantization", None):
        model.quantization = None
    model.peft_config = None
    model.peft_base = None
    model.__dict__.pop("save_adapter_files", None)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# --- files: PEFT's layout -----------------------------------------------------------------------


def peft_key(name: str) -> str:
    """lmlab's state-dict key of an adapter tensor -> PEFT's (Llama-family export names)."""
    return PEFT_PREFIX + (name if name.startswith(("lm_head.", "score.")) else f"model.{name}")


def lmlab_key(key: str) -> str:
    """PEFT's saved key -> lmlab's (adapter names `.default` removed, as PEFT does)."""
    if not key.startswith(PEFT_PREFIX):
        raise CheckpointError(f"adapter tensor {key!r}: not under {PEFT_PREFIX!r}")
    name = key[len(PEFT_PREFIX) :]
    name = name.removeprefix("model.")
    return name.replace(".default.", ".").replace(".default", "")


def _virtual_json(cfg: PeftConfig, mc) -> dict:
    """PEFT's prompt-learning fields; `inference_mode` makes PEFT read the saved table
    (prefix tuning's MLP output) instead of rebuilding the MLP."""
    kv = mc.n_kv_heads * mc.head_dim
    fields = {
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "num_transformer_submodules": 1,
        "num_layers": mc.n_layers,
    }
    if cfg.method == "prompt":
        return {
            **fields,
            "peft_type": "PROMPT_TUNING",
            "token_dim": mc.d_model,
            "num_attention_heads": mc.n_heads,
            "prompt_tuning_init": "RANDOM",  # the trained table is what loads
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
        }
    return {
        **fields,
        "peft_type": "PREFIX_TUNING",
        "token_dim": kv,  # PEFT's rule for grouped-query models: kv_heads × head_dim
        "num_attention_heads": mc.n_kv_heads,
        "encoder_hidden_size": cfg.encoder_hidden_size or kv,
        "prefix_projection": cfg.prefix_projection,
    }


def adapter_config_json(cfg: PeftConfig, base: str | None, adapted: list[str], mc=None) -> dict:
    """`adapter_config.json` as PEFT writes it (what `PeftConfig.from_pretrained` reads).
    A pattern is written as the list of the layers it adapted, by their Hugging Face
    names: PEFT would match a pattern against every module, activations included. `mc`
    (the model's config) sizes prompt and prefix tuning."""
    targets = cfg.target_modules
    if isinstance(targets, str):
        targets = [f"model.{n}" for n in adapted]
    common = {
        "base_model_name_or_path": base,
        "modules_to_save": ["score"] if cfg.task_type == "SEQ_CLS" else None,
        "task_type": cfg.task_type,
        "inference_mode": True,
        "lmlab": asdict(cfg),
    }
    if cfg.method in VIRTUAL:
        return {**common, **_virtual_json(cfg, mc)}
    common |= {"fan_in_fan_out": False, "target_modules": targets}
    if cfg.method == "ia3":
        return {**common, "peft_type": "IA3", "feedforward_modules": cfg.feedforward_modules}
    if cfg.method == "bottleneck":  # lmlab's own layout (PEFT has no bottleneck adapter)
        return {**common, "peft_type": BOTTLENECK_TYPE, "r": cfg.r, "dropout": cfg.dropout}
    return {
        **common,
        "peft_type": "LORA",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.method == "dora",
        "bias": "none",
        "init_lora_weights": True,
    }


def config_from_json(raw: dict, where: Path) -> PeftConfig:
    """lmlab's config of an `adapter_config.json`, lmlab's or PEFT's own."""
    kind = str(raw.get("peft_type", "")).upper()
    task = "SEQ_CLS" if raw.get("task_type") == "SEQ_CLS" else "CAUSAL_LM"
    try:
        heads = {"score", "classifier"} if task == "SEQ_CLS" else set()  # PEFT's SEQ_CLS names
        if set(raw.get("modules_to_save") or []) - heads:
            raise UsageError(f"modules_to_save {raw['modules_to_save']} is not supported")
        if kind in ("PROMPT_TUNING", "PREFIX_TUNING"):
            if raw.get("num_transformer_submodules", 1) != 1:
                raise UsageError("encoder-decoder prompt learning is not supported")
            ours = raw.get("lmlab") or {}
            return TypeAdapter(PeftConfig).validate_python(
                {
                    "method": "prompt" if kind == "PROMPT_TUNING" else "prefix",
                    "num_virtual_tokens": raw["num_virtual_tokens"],
                    "target_modules": [],
                    # PEFT's file holds the MLP's output only; lmlab's keeps the MLP too
                    "prefix_projection": bool(ours.get("prefix_projection", False)),
                    "encoder_hidden_size": ours.get("encoder_hidden_size"),
                    # how the soft prompt started does not matter once trained: the table
                    # in the file is what loads (and loading needs no tokenizer)
                    "init_text": None,
                    "task_type": task,
                }
            )
        if kind == "LORA":
            if raw.get("bias", "none") != "none":
                raise UsageError("trained biases are not supported")
            if raw.get("fan_in_fan_out"):
                raise UsageError("fan_in_fan_out (GPT-2 Conv1D layers) is not supported")
            return TypeAdapter(PeftConfig).validate_python(
                {
                    "method": "dora" if raw.get("use_dora") else "lora",
                    "r": raw["r"],
                    "alpha": raw.get("lora_alpha", 8),
                    "dropout": raw.get("lora_dropout", 0.0),
                    "target_modules": raw["target_modules"],
                    "rslora": bool(raw.get("use_rslora", False)),
                    "feedforward_modules": [],
                    "task_type": task,
                }
            )
        if kind == BOTTLENECK_TYPE:
            return TypeAdapter(PeftConfig).validate_python(raw["lmlab"])
        if kind == "IA3":
            return TypeAdapter(PeftConfig).validate_python(
                {
                    "method": "ia3",
                    "target_modules": raw["target_modules"],
                    "feedforward_modules": raw.get("feedforward_modules") or [],
                    "task_type": task,
                }
            )
    except (KeyError, ValidationError, UsageError) as e:
        raise CheckpointError(f"{where}: unsupported adapter config ({e})") from None
    raise CheckpointError(
        f"{where}: peft_type {raw.get('peft_type')!r} is not supported (lmlab reads LORA, "
        f"IA3, PROMPT_TUNING, PREFIX_TUNING and its own {BOTTLENECK_TYPE})"
    )


def read_adapter_config(path: Path) -> tuple[PeftConfig, str | None]:
    """(config, base model) of an adapter directory; a relative base is resolved against
    the directory."""
    try:
        raw = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: unreadable ({e})") from None
    base = raw.get("base_model_name_or_path")
    if base and not Path(base).is_absolute() and (path / base).exists():
        base = str((path / base).resolve())
    return config_from_json(raw, path / ADAPTER_CONFIG), base


def save_adapter(
    model: nn.Module,
    out: Path,
    state: dict[str, torch.Tensor] | None = None,
    extra: dict | None = None,
) -> None:
    """Write the adapter's tensors (PEFT's names) and `adapter_config.json` into `out`
    (`extra`, such as a training summary, under its `lmlab_extra` key)."""
    cfg = model.peft_config
    state = state if state is not None else model.state_dict()
    names = adapter_names(model)
    tensors = {
        peft_key(k): state[k].detach().contiguous().clone()
        for k in names
        if not k.startswith("virtual_prompt.")
    }
    if virtual_tokens(model):
        tensors |= _virtual_tensors(model, {k: state[k] for k in names})
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    adapted = [n for n, m in model.named_modules() if isinstance(m, ADAPTED)]
    config = adapter_config_json(cfg, model.peft_base, adapted, model.cfg)
    if extra:
        config["lmlab_extra"] = extra
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def _virtual_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> dict:
    """PEFT's `prompt_embeddings` (for prefix tuning with its MLP: the MLP's output, what
    PEFT saves) and, with the MLP, its own tensors so that training resumes exactly."""
    vp = model.virtual_prompt
    own = {k.removeprefix("virtual_prompt."): v for k, v in state.items()}
    with torch.no_grad():
        table = torch.func.functional_call(vp, own, ())
    out = {PROMPT_EMBEDDINGS: table.detach().contiguous().clone()}
    if hasattr(vp, "transform"):
        out |= {PREFIX_ENCODER + k: v.detach().contiguous().clone() for k, v in own.items()}
    return out


def _virtual_state(raw: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """A prompt-learning adapter file's tensors under the model's keys."""
    if PROMPT_EMBEDDINGS not in raw:
        raise CheckpointError(f"{file}: no {PROMPT_EMBEDDINGS!r} tensor")
    mlp = {k[len(PREFIX_ENCODER) :]: v for k, v in raw.items() if k.startswith(PREFIX_ENCODER)}
    if mlp:
        got = {f"virtual_prompt.{k}": v for k, v in mlp.items()}
    else:
        got = {"virtual_prompt.embedding.weight": raw[PROMPT_EMBEDDINGS]}
    return got | {lmlab_key(k): v for k, v in raw.items() if k.startswith(PEFT_PREFIX)}


def load_adapter_weights(model: nn.Module, path: Path) -> None:
    """Load an adapter directory's tensors into a model already adapted with its config."""
    file = path / ADAPTER_WEIGHTS
    try:
        raw = load_file(str(file))
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable adapter weights ({e})") from None
    mine = model.state_dict()
    want = set(adapter_names(model))
    if virtual_tokens(model):
        got = _virtual_state(raw, file)
    else:
        got = {lmlab_key(k): v for k, v in raw.items()}
    missing, extra = want - got.keys(), got.keys() - mine.keys()
    if missing or extra:
        what = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(extra)[:3]}"
        raise CheckpointError(f"{file}: does not fit the model ({what})")
    for k, v in got.items():
        if mine[k].shape != v.shape:
            raise CheckpointError(
                f"{file}: {k} has shape {tuple(v.shape)}, the model needs {tuple(mine[k].shape)}"
            )
    model.load_state_dict(got, strict=False)


def peft_rows(cfg, peft: PeftConfig) -> list[tuple[str, str]]:
    """What an adapter costs before training (`lmlab model info --peft`): trainable
    parameters, and fp32 training memory for weights, gradients and AdamW's two moments,
    against full fine-tuning. Counted on a meta-device model: nothing is allocated."""
    from lmlab.model.encdec import build_model

    with torch.device("meta"):
        model = build_model(cfg)
        layers = len(targets_of(model, peft))
        add_adapters(model, replace(peft, init_text=None))  # the count needs no tokens
    trainable, total = trainable_counts(model)
    mib = 1024**2
    full = total * 4 * 4  # weights, gradients, two AdamW moments
    ours = (total - trainable) * 4 + trainable * 4 * 4
    if peft.method in VIRTUAL:
        what = f"{peft.method} tuning, {peft.num_virtual_tokens} virtual tokens"
        where = ("virtual tokens", f"{peft.num_virtual_tokens} before every sequence")
    else:
        what = "ia3" if peft.method == "ia3" else f"{peft.method}, r={peft.r}"
        where = ("adapted layers", str(layers))
    return [
        ("peft", what),
        where,
        ("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"),
        (
            "training memory, fp32 (weights, grads, AdamW)",
            f"{ours / mib:,.1f} MiB (full fine-tuning: {full / mib:,.1f} MiB); "
            "activations not counted",
        ),
    ]
