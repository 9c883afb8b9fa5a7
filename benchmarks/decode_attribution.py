"""Where a w8a8 decode step's time goes, by subtraction rather than by profiler, and what
`torch.compile` of a static-cache decode step buys.

The torch profiler attributes self-times per operator, but a decode step's int8 products
stream every weight from memory, which evicts everything else from the caches and wakes
the thread pool 121 times: costs the operators around them pay. So this script measures:

1. `step`: the real decode step (`Transformer.forward` with a `KVCache`, batch 1).
2. `step without int8 kernels`: the same step with `w8a8_kernel` replaced by a zero tensor
   of the output's shape: everything but the int8 products.
3. `kernel chain, cold`: the step's 121 int8 products alone (distinct weights per layer,
   so they come from memory as in the model), for each quantized engine PyTorch has here,
   with fp32 `F.linear` and `_weight_int8pack_mm` beside them; and the read bandwidth of
   the machine (a 256 MiB sum), which bounds any weight-streaming step from below.
4. `static-cache step, eager / compiled`: a decode step written for a static KV cache
   (attention over every slot with a mask, the position a tensor, writes by `index_copy_`)
   so that one graph serves every step; the FBGEMM product is wrapped in a
   `torch.library.custom_op` (dynamo cannot pass FBGEMM's packed weights), and the step is
   compiled with `fullgraph=True`. Greedy tokens are checked against the model's own.

Run: `python benchmarks/decode_attribution.py --model W8A8_CHECKPOINT --json attrib.json`
(a checkpoint from `lmlab quantize MODEL --method w8a8 --include-lm-head ...`; about 3
minutes on 2 cores, half of it compiling). Llama-style models only (RoPE, RMSNorm,
q/k/v and gate/up fused).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import machine

_PACKED: dict[int, object] = {}


@torch.library.custom_op("lmlab_bench::w8a8_mm", mutates_args=())
def w8a8_mm(x: torch.Tensor, handle: int, n: int) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x, _PACKED[handle], False)


@w8a8_mm.register_fake
def _(x: torch.Tensor, handle: int, n: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


def timed(fn, reps: int) -> float:
    """Milliseconds per call, after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1000


def decode_ms(model, prompt: int, steps: int, cap: int, step_fn=None) -> tuple[float, list[int]]:
    """Greedy decode of `steps` tokens after a prompt of `prompt` tokens; ms per token."""
    from lmlab.model.transformer import KVCache

    cache = KVCache.empty(model.cfg, 1, cap)
    with torch.no_grad():
        logits = model(torch.arange(1, prompt + 1)[None], cache, logits_to_keep=1)[:, -1]
        tokens = []
        t0 = time.perf_counter()
        for i in range(steps):
            t = logits.argmax(-1)
            tokens.append(int(t))
            if step_fn is None:
                logits = model(t[:, None], cache)[:, -1]
            else:
                logits = step_fn(t[:, None], torch.tensor([prompt + i]), cache.k, cache.v)
    return (time.perf_counter() - t0) / steps * 1000, tokens


def products(model) -> tuple[list, tuple]:
    """Per layer (q/k/v, o, gate/up, down) and the head: (handle, out features, 1/s)."""
    from lmlab.model.quant import W8A8Linear

    def spec(mod: W8A8Linear) -> tuple[int, int, torch.Tensor]:
        if mod._group is not None:
            (packed, _, inv, _), qweight, _ = mod._group.prepared()
            n = qweight.shape[0]
        else:
            packed, _, inv, _ = mod._prepared()
            n = mod.out_features
        _PACKED[id(packed)] = packed
        return id(packed), n, inv

    layers = []
    for blk in model.layers:
        a, mlp = blk.self_attn, blk.mlp
        layers.append((spec(a.q_proj), spec(a.o_proj), spec(mlp.gate_proj), spec(mlp.down_proj)))
    return layers, spec(model.lm_head)


def static_step(model, cap: int):
    """A decode step over a static cache: one graph for every position."""
    from lmlab.model.transformer import apply_rope

    cfg = model.cfg
    layers, head = products(model)
    cos_t, sin_t = model._tables.rope(cap, "cpu")
    hd, ffn = cfg.head_dim, cfg.ffn_hidden
    nq, nk = cfg.n_heads * hd, cfg.n_kv_heads * hd

    def mm(x, s):
        return w8a8_mm(x * s[2], s[0], s[1])

    def step(tokens, pos, k_all, v_all):
        b = tokens.shape[0]
        x = model.embed_tokens(tokens).view(b, -1)
        cos, sin = cos_t[pos][None, None], sin_t[pos][None, None]
        mask = (torch.arange(cap) <= pos)[None, None, None, :]
        for i, blk in enumerate(model.layers):
            qkv_s, o_s, gu_s, down_s = layers[i]
            qkv = mm(blk.input_layernorm(x), qkv_s)
            q = qkv[:, :nq].view(b, 1, cfg.n_heads, hd).transpose(1, 2)
            k = qkv[:, nq : nq + nk].view(b, 1, cfg.n_kv_heads, hd).transpose(1, 2)
            v = qkv[:, nq + nk :].view(b, 1, cfg.n_kv_heads, hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k_all[i].index_copy_(2, pos, k)
            v_all[i].index_copy_(2, pos, v)
            y = F.scaled_dot_product_attention(
                q, k_all[i], v_all[i], attn_mask=mask, enable_gqa=cfg.n_kv_heads != cfg.n_heads
            )
            x = x + mm(y.transpose(1, 2).reshape(b, -1), o_s)
            gu = mm(blk.post_attention_layernorm(x), gu_s)
            x = x + mm(F.silu(gu[:, :ffn]) * gu[:, ffn:], down_s)
        return mm(model.norm(x), head)[:, : cfg.vocab_size]

    return step


def kernel_chain(model, reps: int) -> dict[str, float]:
    """ms for the step's int8 products alone, distinct weights (cold caches), batch 1."""
    layers, head = products(model)
    shapes = [(inv.numel(), n) for lay in layers for _, n, inv in lay]
    shapes.append((head[2].numel(), head[1]))
    weights = [
        (torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) * 0.01 + 1e-3)
        for k, n in shapes
    ]
    xs = {k: torch.randn(1, k) for k, _ in shapes}
    out = {}
    engine0 = torch.backends.quantized.engine
    for engine in ("fbgemm", "x86", "onednn"):
        if engine not in torch.backends.quantized.supported_engines:
            continue
        torch.backends.quantized.engine = engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            packed = [
                torch.ops.quantized.linear_prepack(
                    torch._make_per_channel_quantized_tensor(
                        q, s.double(), torch.zeros(q.shape[0], dtype=torch.long), 0
                    ),
                    None,
                )
                for q, s in weights
            ]
        pairs = list(zip(shapes, packed, strict=True))
        out[f"int8 x int8, {engine}"] = timed(
            lambda p=pairs: [
                torch.ops.quantized.linear_dynamic(xs[k], w, False) for (k, _), w in p
            ],
            reps,
        )
    torch.backends.quantized.engine = engine0
    pairs = list(zip(shapes, weights, strict=True))
    out["int8 weight-only, _weight_int8pack_mm"] = timed(
        lambda: [torch._weight_int8pack_mm(xs[k], q, s) for (k, _), (q, s) in pairs],
        max(reps // 4, 2),
    )
    floats = [(k, q.float() * s[:, None]) for (k, _), (q, s) in pairs]
    out["fp32 F.linear"] = timed(lambda: [F.linear(xs[k], w) for k, w in floats], reps)
    out["int8 weight MiB"] = sum(k * n for k, n in shapes) / 2**20
    return out


def bandwidth_gbs() -> float:
    a = torch.ones(64 * 2**20)
    return a.numel() * 4 / timed(lambda: a.sum(), 5) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a w8a8 checkpoint (with the head)")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import lmlab.model.quant as Q
    from lmlab import load_model

    model = load_model(args.model).eval()
    cap = args.prompt + args.steps + 8
    res: dict = {"machine": machine(), "config": vars(args) | {"json": None}}
    res["step"], ref = decode_ms(model, args.prompt, args.steps, cap)

    sizes = {}
    for mod in model.modules():
        if isinstance(mod, Q.W8A8Linear):
            packed = mod._prepared()[0]
            if mod._group is not None:
                (packed, *_), qweight, _ = mod._group.prepared()
                sizes[id(packed)] = qweight.shape[0]
            elif packed is not None:
                sizes[id(packed)] = mod.out_features
    real = Q.w8a8_kernel
    Q.w8a8_kernel = lambda x, packed, qmax=None: x.new_zeros(x.shape[0], sizes[id(packed)])
    try:
        res["step without int8 kernels"], _ = decode_ms(model, args.prompt, args.steps, cap)
    finally:
        Q.w8a8_kernel = real
    res["kernel chain, cold"] = kernel_chain(model, 10)
    res["read bandwidth GB/s"] = bandwidth_gbs()
    step = static_step(model, cap)
    res["static-cache step, eager"], tokens = decode_ms(model, args.prompt, args.steps, cap, step)
    res["static-cache eager same tokens"] = tokens == ref
    t0 = time.perf_counter()
    compiled = torch.compile(step, fullgraph=True)
    decode_ms(model, args.prompt, 2, cap, compiled)
    res["compile seconds"] = time.perf_counter() - t0
    res["static-cache step, compiled"], tokens = decode_ms(
        model, args.prompt, args.steps, cap, compiled
    )
    res["static-cache compiled same tokens"] = tokens == ref
    res["step (again)"], _ = decode_ms(model, args.prompt, args.steps, cap)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    print(res["machine"])
    for k, v in res.items():
        if k not in ("machine", "config"):
            print(f"{k}: {json.dumps(v) if isinstance(v, dict) else v}")


if __name__ == "__main__":
    main()
