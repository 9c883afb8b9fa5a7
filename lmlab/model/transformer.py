"""One Transformer for the design space of Zhao et al. §4.2, read from `ModelConfig` flags.

Causal and prefix decoders live here; the encoder-decoder (`encdec.py`) reuses the same
blocks. Names follow Hugging Face's Llama (`embed_tokens`, `layers.i.self_attn.q_proj`, ...)
and every convention is the reference's (RoPE rotates the two halves of each head, as
`rotate_half`; norms compute in float32), so `lmlab.model.hf` maps weights one to one.

Attention goes through PyTorch's scaled-dot-product attention: with no mask to build
(plain causal, no padding, no bias) it takes the `is_causal` path, which uses flash
kernels where the device has them; anything else (padding, prefix, sliding window,
packed documents, ALiBi or T5 biases) builds one explicit mask per forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import UsageError
from lmlab.model.config import GATED, ModelConfig, deepnorm_constants

# --- normalization -----------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics: in bf16 the mean of squares loses too many bits.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with float32 statistics, optionally without a bias (PaLM)."""

    def __init__(self, dim: int, eps: float, bias: bool) -> None:
        super().__init__(dim, eps=eps, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float()
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return LayerNorm(cfg.d_model, cfg.norm_eps, cfg.uses_norm_bias)


# --- positions ---------------------------------------------------------------------------


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rotated dims; NTK-aware scaling raises the base so the
    lowest frequency stretches by the factor while the highest stays (bloc97's rule:
    θ' = θ·s^(d/(d-2)))."""
    rd = cfg.rotary_dim
    theta = cfg.rope_theta
    if cfg.rope_scaling == "ntk":
        theta = theta * cfg.rope_scaling_factor ** (rd / (rd - 2))
    return 1.0 / (theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))


def rope_tables(cfg: ModelConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [length, rotary_dim]; linear scaling (position interpolation, Chen et al.
    2023) divides positions by the factor so a longer context maps into the trained range."""
    t = torch.arange(length, dtype=torch.float32)
    if cfg.rope_scaling == "linear":
        t = t / cfg.rope_scaling_factor
    freqs = torch.outer(t, rope_inv_freq(cfg))
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [B|1, 1, T, R] with R <= D. Rotates the (x1, x2) halves of
    the first R dims as HF's `rotate_half`; the rest pass through (partial rotary, NeoX)."""
    r = cos.shape[-1]
    xr, rest = x[..., :r], x[..., r:]
    x1, x2 = xr.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = (xr * cos + rotated * sin).to(x.dtype)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """Vaswani et al.: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Press et al. (2022): a geometric sequence starting at 2^(-8/n) with that ratio; for
    a head count that is not a power of two, the closest power's slopes plus every other
    slope of the next power's sequence."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(power_of_two(closest) + extra)


def t5_buckets(
    relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's relative-position buckets (Raffel et al.): exact buckets for small distances,
    logarithmic ones up to `max_distance`; `relative` = key position − query position."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    large = max_exact + (
        torch.log(relative.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative, large)


# --- masks -------------------------------------------------------------------------------


def prefix_mask(prefix_len: torch.Tensor, length: int) -> torch.Tensor:
    """Bool [B, 1, T, T]: causal, plus full attention among each row's first `prefix_len`
    tokens (a prefix decoder, Zhao et al. §4.2.1)."""
    i = torch.arange(length)
    causal = i[None, :] <= i[:, None]
    in_prefix = i[None, :] < prefix_len.view(-1, 1, 1)
    return (causal[None] | in_prefix)[:, None]


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, T, T] that stops attention crossing document boundaries in a packed
    sequence: `doc_ids[b, t]` names the document of each token (causality is added later)."""
    return (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]


@dataclass
class KVCache:
    """Preallocated keys/values for every layer: [layers, B, kv_heads, max_len, head_dim],
    or one [B, kv_heads, max_len, head_dim] tensor per layer (`per_layer`: what a compiled
    decode step writes into in place; slots in one shared tensor would make it copy the
    whole cache per write).

    The model talks to a cache only through `pos` (the slot of the first new token),
    `capacity`, `update` and `advance`, so another layout (the paged cache of
    `lmlab.infer.paged`) plugs in unchanged. Setting `pos` back rolls the cache back:
    speculative decoding drops rejected draft tokens that way."""

    k: torch.Tensor | list[torch.Tensor]
    v: torch.Tensor | list[torch.Tensor]
    pos: int = 0

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new keys/values [B, kv_heads, t, hd] at slots pos.. and return all
        keys/values up to them."""
        start, t = self.pos, k.shape[2]
        keys, values = self.k[layer], self.v[layer]
        keys[:, :, start : start + t] = k
        values[:, :, start : start + t] = v
        return keys[:, :, : start + t], values[:, :, : start + t]

    def advance(self, t: int) -> None:
        self.pos += t

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder or repeat) batch rows: beam search and n-samples use this."""
        if isinstance(self.k, list):
            self.k = [t.index_select(0, rows) for t in self.k]
            self.v = [t.index_select(0, rows) for t in self.v]
        else:
            self.k = self.k.index_select(1, rows)
            self.v = self.v.index_select(1, rows)

    @classmethod
    def empty(
        cls,
        cfg: ModelConfig,
        batch: int,
        max_len: int,
        device=None,
        dtype=None,
        per_layer: bool = False,
    ):
        layers = cfg.n_decoder_layers if cfg.family == "encoder_decoder" else cfg.n_layers
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        dtype = dtype or torch.float32
        if per_layer:
            return cls(
                [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)],
                [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)],
            )
        return cls(
            torch.zeros((layers, *shape), device=device, dtype=dtype),
            torch.zeros((layers, *shape), device=device, dtype=dtype),
        )


@dataclass
class SlotWriter:
    """A per-layer `KVCache`'s buffers as one compiled decode step sees them
    (`decode_step`): the new token's keys/values go to slot `at` (a tensor), and attention
    reads every slot under a mask. No shape depends on the position, so one graph serves
    every step."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    at: torch.Tensor  # [1] long

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.k[layer].index_copy_(2, self.at, k)
        self.v[layer].index_copy_(2, self.at, v)
        return self.k[layer], self.v[layer]


class ConcatCache:
    """Keys/values held per layer and grown by concatenation: no in-place writes, so
    gradients flow through it. A virtual prefix (prefix or prompt tuning) trains through
    this one; `KVCache` serves generation."""

    capacity = 1 << 62

    def __init__(self, n_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[layer] is not None:
            b = k.shape[0]  # a prefix computed once for a batch of one serves every row
            k = torch.cat([self.k[layer].expand(b, -1, -1, -1).to(k.dtype), k], dim=2)
            v = torch.cat([self.v[layer].expand(b, -1, -1, -1).to(v.dtype), v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def advance(self, t: int) -> None:
        self.pos += t


@dataclass
class AttnContext:
    """What every layer of one forward shares: rotary tables and the attention masks.

    `mask[local]` is None (plain causal or full attention, decided by `is_causal`), a bool
    mask, or a float bias (ALiBi / T5 with the mask folded in), each [B|1, 1|H, T, S]."""

    cos: torch.Tensor | None
    sin: torch.Tensor | None
    mask: dict[bool, torch.Tensor | None]
    is_causal: bool


def build_masks(
    cfg: ModelConfig,
    t: int,
    start: int,
    device,
    dtype,
    causal: bool = True,
    key_mask: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
    prefix_len: torch.Tensor | None = None,
    pos_bias: nn.Module | None = None,
    layers: int | None = None,
) -> tuple[dict[bool, torch.Tensor | None], bool]:
    """Masks for queries at slots [start, start+t) over keys at slots [0, start+t).

    Slots are positions in the sequence (and cache), so causality, windows and relative
    distances are measured in slots, as the references do; padding is a key mask."""
    s = start + t
    q = torch.arange(start, s, device=device)[:, None]
    k = torch.arange(s, device=device)[None, :]
    bias = None
    if cfg.position == "alibi":
        slopes = alibi_slopes(cfg.n_heads).to(device)
        dist = (q - k).abs() if not causal or prefix_len is not None else (q - k)
        bias = -slopes[:, None, None] * dist[None].float()  # [H, T, S]
    elif cfg.position == "t5" and pos_bias is not None:
        bias = pos_bias(k - q, bidirectional=not causal or prefix_len is not None)
    n_layers = layers if layers is not None else cfg.n_layers
    kinds = {cfg.is_local(i) for i in range(n_layers)}
    plain = bias is None and key_mask is None and extra is None and prefix_len is None
    masks: dict[bool, torch.Tensor | None] = {}
    for local in kinds:
        window = cfg.sliding_window if local else None
        if plain and window is None and (not causal or start == 0 or t == 1):
            masks[local] = None  # SDPA's own causal/full path (flash where available)
            continue
        allowed = (k <= q) if causal else torch.ones(t, s, dtype=torch.bool, device=device)
        allowed = allowed[None, None]  # [1, 1, T, S]
        if prefix_len is not None:
            in_prefix = k[None] < prefix_len.to(device).view(-1, 1, 1)
            allowed = allowed | in_prefix[:, None]
        if window is not None:
            allowed = allowed & (k > q - window)[None, None]
        if key_mask is not None:
            allowed = allowed & key_mask.bool()[:, None, None, :s]
        if extra is not None:
            allowed = allowed & extra.to(device)[..., -t:, :s]
        # a query with no allowed key (padding) attends everywhere: finite, and ignored
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        if bias is None:
            masks[local] = allowed
        else:
            neg = torch.finfo(dtype).min
            masks[local] = bias[None].to(dtype).masked_fill(~allowed, neg)
    return masks, causal and start == 0


class RelativePositionBias(nn.Module):
    """T5's learned bias per (bucket, head), shared by every layer of a stack."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.rel_buckets, cfg.n_heads))

    def forward(self, relative: torch.Tensor, bidirectional: bool) -> torch.Tensor:
        b = t5_buckets(relative, bidirectional, self.cfg.rel_buckets, self.cfg.rel_max_distance)
        return self.weight[b].permute(2, 0, 1).float()  # [H, T, S]


# --- layers ------------------------------------------------------------------------------


def siblings(*projections: nn.Module):
    """The group running these projections as one product (quantized siblings that read
    one input: `lmlab.model.quant.W8A8Group`), or None. A projection replaced since (an
    adapter wrapping it) breaks the group, and each runs on its own."""
    group = projections[0].__dict__.get("_group")
    if group is None or len(group.members) != len(projections):
        return None
    if all(m is p and m._group is group for m, p in zip(group.members, projections, strict=True)):
        return group
    return None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd, qkv_bias = cfg.head_dim, cfg.uses_qkv_bias
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=cfg.bias)

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttnContext,
        layer: int,
        cache: KVCache | None,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Self-attention over x (with the cache), or cross-attention over `memory`."""
        b, t, _ = x.shape
        cfg = self.cfg
        src = x if memory is None else memory
        fused = siblings(self.q_proj, self.k_proj, self.v_proj) if memory is None else None
        if fused is not None:
            q, k, v = fused.outputs(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(src), self.v_proj(src)
        q = q.view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(b, src.shape[1], cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(b, src.shape[1], cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        if memory is None and ctx.cos is not None:
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if cache is not None and memory is None:
            k, v = cache.update(layer, k, v)
        mask = ctx.mask[cfg.is_local(layer)] if memory is None else ctx.mask[False]
        y = F.scaled_dot_product_attention(
            q,
            k.to(q.dtype),
            v.to(q.dtype),
            attn_mask=mask,
            is_causal=ctx.is_causal and mask is None and t > 1,
            scale=cfg.attn_scale,
            # grouped-query: each K/V head serves a group of query heads, without copying
            # the keys per query head (the whole cache, every decode step)
            enable_gqa=cfg.n_kv_heads != cfg.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


ACTIVATIONS = {
    "swiglu": F.silu,
    "silu": F.silu,
    "geglu": F.gelu,
    "gelu": F.gelu,
    "geglu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class MLP(nn.Module):
    """Gated (SwiGLU/GeGLU: down(act(gate(x)) · up(x))) or plain (down(act(up(x))))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.gated = cfg.activation in GATED
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            fused = siblings(self.gate_proj, self.up_proj)
            if fused is not None:
                gate, up = fused.outputs(x)
            else:
                gate, up = self.gate_proj(x), self.up_proj(x)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.up_proj(x)))


class MoE(nn.Module):
    """Mixture-of-experts FFN (Switch / GShard / Mixtral): a router picks the top-k experts
    per token and mixes their outputs with the renormalised router probabilities.

    With `capacity_factor`, each expert takes at most ceil(cf · tokens · k / experts)
    assignments; first choices are served before second choices, and within a choice
    earlier tokens first. A dropped assignment contributes nothing (the residual carries
    the token on). `aux_loss` is Switch's load-balancing loss E · Σ_e f_e · P_e, with f_e
    the share of assignments routed to e (summing to k) and P_e the mean router
    probability; it is 1·k at perfect balance and grows as routing collapses."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_experts))
        self.aux_loss = torch.zeros(())
        self.dropped = 0.0  # share of assignments dropped for capacity in the last forward

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(expert index [N, k], weight [N, k], kept [N, k]) for N tokens."""
        cfg = self.cfg
        probs = self.router(flat).float().softmax(-1)
        weight, index = probs.topk(cfg.experts_top_k, dim=-1)
        weight = weight / weight.sum(-1, keepdim=True)
        n = flat.shape[0]
        onehot = F.one_hot(index, cfg.n_experts).float()  # [N, k, E]
        share = onehot.sum(1).mean(0)  # f_e, sums to k
        self.aux_loss = cfg.n_experts * (share * probs.mean(0)).sum()
        kept = torch.ones_like(index, dtype=torch.bool)
        if cfg.capacity_factor is not None:
            cap = math.ceil(cfg.capacity_factor * n * cfg.experts_top_k / cfg.n_experts)
            # order: choice rank first, then token; rank of each assignment within its expert
            order = onehot.transpose(0, 1).reshape(-1, cfg.n_experts)  # [k·N, E]
            rank = (order.cumsum(0) - 1) * order
            rank = rank.sum(-1).view(cfg.experts_top_k, n).t()  # [N, k]
            kept = rank < cap
        self.dropped = float(1 - kept.float().mean())
        return index, weight.to(flat.dtype), kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        index, weight, kept = self.route(flat)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.nonzero((index == e) & kept, as_tuple=True)
            if tok.numel():
                out.index_add_(0, tok, expert(flat[tok]) * weight[tok, slot, None])
        return out.view(shape)


class Block(nn.Module):
    """One layer: self-attention (+ cross-attention in a decoder over an encoder) and FFN,
    wired pre-LN, post-LN (optionally DeepNorm), sandwich-LN or parallel."""

    def __init__(self, cfg: ModelConfig, cross: bool = False, alpha: float = 1.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.alpha = alpha  # DeepNorm's residual scale (1 otherwise)
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg)
        if cross:
            self.cross_attn_layernorm = make_norm(cfg)
            self.cross_attn = Attention(cfg)
        if not (cfg.parallel_residual and cfg.parallel_norms == 1):
            self.post_attention_layernorm = make_norm(cfg)
        if cfg.norm_position == "sandwich":
            self.attn_out_norm = make_norm(cfg)
            self.mlp_out_norm = make_norm(cfg)
            if cross:
                self.cross_out_norm = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)

    def _sub(self, x, f, norm: nn.Module, out_norm: nn.Module | None) -> torch.Tensor:
        pos = self.cfg.norm_position
        if pos == "post":
            return norm(self.alpha * x + f(x))
        y = f(norm(x))
        return x + (out_norm(y) if pos == "sandwich" else y)

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttnContext,
        layer: int,
        cache: KVCache | None,
        memory: torch.Tensor | None = None,
        cross_ctx: AttnContext | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        if cfg.parallel_residual:
            h = self.input_layernorm(x)
            h2 = self.post_attention_layernorm(x) if cfg.parallel_norms == 2 else h
            return x + self.self_attn(h, ctx, layer, cache) + self.mlp(h2)
        sandwich = cfg.norm_position == "sandwich"
        x = self._sub(
            x,
            lambda h: self.self_attn(h, ctx, layer, cache),
            self.input_layernorm,
            self.attn_out_norm if sandwich else None,
        )
        if memory is not None:
            x = self._sub(
                x,
                lambda h: self.cross_attn(h, cross_ctx, layer, None, memory),
                self.cross_attn_layernorm,
                self.cross_out_norm if sandwich else None,
            )
        return self._sub(
            x,
            self.mlp,
            self.post_attention_layernorm,
            self.mlp_out_norm if sandwich else None,
        )


# --- the model ---------------------------------------------------------------------------


def init_weights(model: nn.Module, cfg: ModelConfig, layers: int, beta: float = 1.0) -> None:
    """Normal(0, init_std) for matrices and embeddings, zero biases, unit norm gains;
    GPT-2 scales residual outputs (o_proj, down_proj) by 1/sqrt(2·layers); small-init
    embeddings draw U(±1e-4); DeepNorm uses Xavier-normal with gain β for the value,
    output and FFN projections (gain 1 for queries and keys)."""
    std = cfg.init_std
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 2)
        if name.endswith("bias") and "rel_pos_bias" not in name:
            nn.init.zeros_(p)
        elif p.dim() == 1:
            nn.init.ones_(p)
        elif "embed_tokens" in name and cfg.small_embed_init:
            nn.init.uniform_(p, -1e-4, 1e-4)
        elif cfg.deepnorm and p.dim() == 2 and "embed" not in name and "lm_head" not in name:
            gain = 1.0 if leaf[-2] in ("q_proj", "k_proj", "router") else beta
            nn.init.xavier_normal_(p, gain=gain)
        elif cfg.scaled_residual_init and name.endswith(("o_proj.weight", "down_proj.weight")):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * layers))
        else:
            nn.init.normal_(p, 0.0, std)


def positions_from(attention_mask: torch.Tensor | None, start: int, t: int, device) -> torch.Tensor:
    """Position ids [B|1, T]: counted over real tokens when a padding mask is given (so a
    left-padded row starts at 0, as HF does), else the slots start..start+t."""
    if attention_mask is not None and attention_mask.dim() == 2:
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.clamp(min=0)[:, start : start + t]
    return torch.arange(start, start + t, device=device)[None]


class Transformer(nn.Module):
    """`forward(input_ids[B, T]) -> logits[B, T, vocab_size]` (the `load_model` contract).

    Optional inputs: `attention_mask` ([B, S] padding mask over past + current tokens, or a
    bool [B, 1, T, S] mask such as `document_mask`), `position_ids` [B, T], `prefix_len`
    [B] (prefix decoders: tokens before it see each other both ways), a `KVCache`,
    `logits_to_keep` (as transformers: only the last n positions' logits; 0 = all),
    `hidden=True` for the final hidden states [B, T, d_model] in place of the logits
    (what embeddings pool), `score_at` [B] for a reward head's score of each row at
    that position (`reward_head` models), and `with_scores=True` for (logits, the head's
    score at every position): a policy and its value head in one forward (PPO);
    `inputs_embeds` [B, T, d] in place of `input_ids` (soft prompts).

    A model given a `virtual_prompt` module (prefix or prompt tuning,
    `lmlab.model.adapters`) puts its virtual tokens before every sequence: without a cache
    their keys/values come first in every layer; a generation cache holds them from the
    start (`lmlab.infer.engine.Runner`). The outputs cover the real tokens only."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.family == "encoder_decoder":
            raise ValueError("family encoder_decoder is lmlab.model.encdec.EncoderDecoder")
        self.cfg = cfg
        d = cfg.d_model
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, d)
        if cfg.position == "learned":
            self.embed_positions = nn.Embedding(cfg.max_seq_len + cfg.learned_pos_offset, d)
        if cfg.embed_norm:
            self.embed_norm = make_norm(cfg)
        if cfg.position == "t5":
            self.rel_pos_bias = RelativePositionBias(cfg)
        alpha, beta = (1.0, 1.0)
        if cfg.deepnorm:
            alpha, beta = deepnorm_constants(cfg.n_layers)["decoder"]
        self.layers = nn.ModuleList(Block(cfg, alpha=alpha) for _ in range(cfg.n_layers))
        if cfg.has_final_norm:
            self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(d, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if cfg.reward_head:
            self.score = nn.Linear(d, 1, bias=False)
        self._tables = PositionTables(cfg)
        init_weights(self, cfg, cfg.n_layers, beta)

    def reset_parameters(self) -> None:
        beta = deepnorm_constants(self.cfg.n_layers)["decoder"][1] if self.cfg.deepnorm else 1.0
        init_weights(self, self.cfg, self.cfg.n_layers, beta)

    def aux_loss(self) -> torch.Tensor | None:
        """The weighted MoE load-balancing loss of the last forward (None when dense)."""
        if not self.cfg.n_experts:
            return None
        total = sum(layer.mlp.aux_loss for layer in self.layers)
        return self.cfg.moe_aux_loss_coef * total / len(self.layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        prefix_len: torch.Tensor | int | None = None,
        logits_to_keep: int = 0,
        hidden: bool = False,
        score_at: torch.Tensor | None = None,
        with_scores: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        b, t = input_ids.shape if inputs_embeds is None else inputs_embeds.shape[:2]
        virtual = self._modules.get("virtual_prompt")
        if virtual is not None and cache is None:
            # prefix or prompt tuning: the virtual tokens' keys/values come first (a
            # generation cache gets them once, from the engine)
            cache = virtual.cache(self)
            attention_mask = virtual.widen_mask(attention_mask)
        start = cache.pos if cache is not None else 0
        device = (input_ids if inputs_embeds is None else inputs_embeds).device
        if cfg.position == "learned" and start + t > cfg.max_seq_len:
            raise ValueError(
                f"sequence of {start + t} tokens exceeds max_seq_len={cfg.max_seq_len} "
                "(learned positions cannot extrapolate)"
            )
        if cache is not None and start + t > cache.capacity:
            raise ValueError(
                f"sequence of {start + t} tokens exceeds the KV cache ({cache.capacity} slots)"
            )
        # positions we derive never pass their slots, so the tables' length is known without
        # reading the ids (a device sync, and a torch.compile graph break)
        bound = start + t if position_ids is None else None
        if position_ids is None:
            position_ids = positions_from(attention_mask, start, t, device)
        if isinstance(prefix_len, int):
            prefix_len = torch.full((b,), prefix_len, dtype=torch.long)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if cfg.position == "learned":
            x = x + self.embed_positions(position_ids + cfg.learned_pos_offset)
        elif cfg.position == "sinusoidal":
            x = x + self._tables.sinusoidal_at(position_ids, bound).to(x.dtype)
        if cfg.embed_norm:
            x = self.embed_norm(x)
        key_mask = (
            attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        )
        extra = attention_mask if attention_mask is not None and attention_mask.dim() == 4 else None
        masks, is_causal = build_masks(
            cfg,
            t,
            start,
            device,
            x.dtype,
            causal=True,
            key_mask=key_mask,
            extra=extra,
            prefix_len=prefix_len if cfg.family == "prefix" else None,
            pos_bias=getattr(self, "rel_pos_bias", None),
        )
        cos = sin = None
        if cfg.position == "rope":
            cos, sin = self._tables.rope_at(position_ids, bound)
        ctx = AttnContext(cos, sin, masks, is_causal)
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, i, cache)
        if cache is not None:
            cache.advance(t)
        if logits_to_keep:  # a prefill needs only the last position's logits
            x = x[:, -logits_to_keep:]
        if cfg.has_final_norm:
            x = self.norm(x)
        if hidden:
            return x
        if score_at is not None:  # a reward model: one scalar per row, at these positions
            return self.score(x[torch.arange(b, device=x.device), score_at]).squeeze(-1)
        logits = self.lm_head(x)[..., : cfg.vocab_size]
        if with_scores:  # a policy with a value head (PPO): logits and a value per position
            return logits, self.score(x).squeeze(-1)
        return logits


def decode_step_unsupported(model: nn.Module) -> str | None:
    """Why `decode_step` cannot serve this model (None when it can)."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(model, Transformer) or cfg.family != "decoder":
        return "it needs a decoder-only model"
    if cfg.position not in ("rope", "none"):
        return f"it needs RoPE or no positions, not {cfg.position}"
    if any(cfg.is_local(i) for i in range(cfg.n_layers)):
        return "sliding-window layers are not supported"
    if cfg.n_experts:
        return "mixture-of-experts routing has data-dependent shapes"
    if model._modules.get("virtual_prompt") is not None:
        return "a virtual prompt (prefix or prompt tuning) is not supported"
    return None


def decode_step(
    model: Transformer,
    tokens: torch.Tensor,
    slots: SlotWriter,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [B, V] for one new token per row [B, 1] written at slot `slots.at`: the
    forward of a decode step with the position a tensor and a mask over the whole cache,
    so `torch.compile` makes one graph of it. `key_mask` [B, slots] marks real tokens
    (left padding); positions then count them, as `positions_from` does. The caller
    advances the cache. Models: see `decode_step_unsupported`."""
    cfg = model.cfg
    cap = slots.k[0].shape[2]
    allowed = torch.arange(cap, device=tokens.device) <= slots.at  # [slots]
    if key_mask is None:
        pos = slots.at[None]  # [1, 1]
        mask = allowed[None, None, None]
    else:
        pos = key_mask.cumsum(-1).index_select(1, slots.at) - 1
        mask = (allowed & key_mask.bool())[:, None, None]
    x = model.embed_tokens(tokens)
    if cfg.embed_norm:
        x = model.embed_norm(x)
    cos = sin = None
    if cfg.position == "rope":
        cos_t, sin_t = model._tables.rope(cap, tokens.device)
        cos, sin = cos_t[pos][:, None], sin_t[pos][:, None]
    ctx = AttnContext(cos, sin, {False: mask}, is_causal=False)
    for i, layer in enumerate(model.layers):
        x = layer(x, ctx, i, slots)
    if cfg.has_final_norm:
        x = model.norm(x)
    return model.lm_head(x[:, -1])[:, : cfg.vocab_size]


def with_score_head(model: Transformer) -> Transformer:
    """The same decoder with a zero-initialised scalar head `score` (a reward model's, or
    a policy's value head)."""
    head = Transformer(replace(model.cfg, reward_head=True)).to(model.embed_tokens.weight.device)
    missing, unexpected = head.load_state_dict(model.state_dict(), strict=False)
    if unexpected or set(missing) != {"score.weight"}:
        raise UsageError(f"reward head: weights do not fit ({missing or unexpected})")
    nn.init.zeros_(head.score.weight)
    return head


class PositionTables:
    """RoPE and sinusoidal tables, grown on demand: positions past the trained length are
    how RoPE scaling and extrapolation are used at all. Not a module: nothing to save."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._sin: torch.Tensor | None = None

    def rope(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].shape[0] < length or self._rope[0].device != device:
            n = max(length, self.cfg.max_seq_len)
            self._rope = rope_tables(self.cfg, n, device)
        return self._rope

    def rope_at(
        self, pos: torch.Tensor, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for position ids [B, T], shaped [B, 1, T, rotary_dim] for the heads.
        `length` (> every id) spares reading the largest id from the tensor."""
        cos, sin = self.rope(length or int(pos.max()) + 1, pos.device)
        return cos[pos][:, None], sin[pos][:, None]

    def sinusoidal_at(self, pos: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """The sinusoidal embedding [B, T, d] of position ids [B, T]."""
        return self.sinusoidal(length or int(pos.max()) + 1, pos.device)[pos]

    def sinusoidal(self, length: int, device) -> torch.Tensor:
        if self._sin is None or self._sin.shape[0] < length or self._sin.device != device:
            n = max(length, self.cfg.max_seq_len)
            self._sin = sinusoidal_table(n, self.cfg.d_model).to(device)
        return self._sin
