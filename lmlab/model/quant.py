"""The quantized-layer format (Zhao et al. §5.4): INT8, packed INT4 and LLM.int8() linears.

Four methods; the first three need no calibration data:

- `int8`: weight-only, per-output-channel symmetric absmax (one fp32 scale per row).
- `int4`: weight-only, group-wise along the input dim, asymmetric (an fp16 scale and an fp16
  minimum per group, as llama.cpp's Q4_1), two 4-bit codes per byte.
- `llm_int8`: Dettmers et al. (2022): at forward time the input features that reach the
  outlier threshold are multiplied in floating point, the rest in int8 × int8 with int32
  accumulation, activations quantized per row and weights per output channel.
- `w8a8`: weights and activations in int8, so the product runs on PyTorch's FBGEMM int8
  kernels, the only int8 path that beats float32 on AVX2 CPUs. Activations are quantized
  per token at run time. What keeps the model intact is calibrated: SmoothQuant's
  per-channel smoothing (Xiao et al. 2023) moves activation range into the weights, and
  the few input channels that still reach the largest values stay in float (LLM.int8()'s
  decomposition, with the columns chosen once from calibration data instead of per batch).

Every `nn.Linear` of the transformer blocks is replaced (attention, MLP, MoE experts);
embeddings, norms, MoE routers and, by default, `lm_head` stay in full precision. A quantized
model is saved as an lmlab checkpoint whose `config.json` carries a `quantization` block, and
`load_quantized` (the loader's `quantized` reader) builds the same modules back. The format
lives in the model layer so that loading a checkpoint never reaches above it; the `quantize`
command with its size / speed / perplexity report is `lmlab.infer.quantize`.
docs/quantization.md has the format and the measurements.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import CheckpointError, UsageError
from lmlab.model.checkpoint import read_config, read_weights, save_checkpoint
from lmlab.model.config import ModelConfig
from lmlab.model.encdec import build_model

METHODS = ("int8", "int4", "llm_int8", "w8a8")
GROUP_SIZES = (32, 64, 128)
QUANT_FORMAT = "lmlab-quant/1"
INT8_BACKENDS = ("auto", "kernel", "dequant")
# int8 × int8 products summed over 1024 inputs stay below 2^24 (1024·127² = 16,516,096),
# so a float32 matmul over such a chunk is exact integer arithmetic.
EXACT_FP32_CHUNK = 1024

_settings = {"int8_backend": "auto"}


# --- the number formats ------------------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric absmax: q = round(w / s) with s = max|w_row| / 127, so every
    weight lies within s/2 of q·s. An all-zero row gets s = 1 (and q = 0)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [..., K] (K even) → bytes [..., K/2]: element 2j in the low nibble of byte
    j, element 2j+1 in the high nibble."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def quantize_int4(
    w: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups of `group_size` consecutive inputs of a row: w ≈ q·s + m with q in 0..15,
    m the group minimum and s = (max − m)/15, both stored in float16.

    Asymmetric, because with only 16 levels a group's weights are rarely centred on zero:
    symmetric absmax would spend part of the range on values no weight takes. The stored
    m is rounded down and s up, so [m, m + 15·s] still covers the group and every weight
    stays within s/2 of its code's value after the float16 rounding."""
    n, k = w.shape
    wg = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    mins = lo.half()
    mins = torch.where(mins.float() > lo, torch.nextafter(mins, _full(mins, -math.inf)), mins)
    span = (hi - mins.float()) / 15.0
    scales = span.half()
    scales = torch.where(
        scales.float() < span, torch.nextafter(scales, _full(scales, math.inf)), scales
    )
    if not (torch.isfinite(mins).all() and torch.isfinite(scales).all()):
        raise UsageError(
            "int4: weights beyond the float16 range (|w| > 65504) cannot be given float16 "
            "group scales; use int8"
        )
    s = scales.float()[..., None]
    q = torch.round((wg - mins.float()[..., None]) / torch.where(s > 0, s, 1.0)).clamp(0, 15)
    return pack_int4(q.reshape(n, k)), scales, mins


def _full(t: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full_like(t, value)


def dequantize_int4(
    packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int
) -> torch.Tensor:
    q = unpack_int4(packed)
    n, k = q.shape
    w = q.view(n, k // group_size, group_size).float() * scales.float()[..., None]
    return (w + mins.float()[..., None]).view(n, k)


# --- kernels -----------------------------------------------------------------------------


def set_int8_backend(name: str) -> None:
    """How int8 products run on CPU: `kernel` (PyTorch's `_weight_int8pack_mm` for int8
    weights, `torch._int_mm` for LLM.int8), `dequant` (float matmuls over the int8 values),
    or `auto` (the default).

    `auto` takes `_weight_int8pack_mm` only on AVX-512 CPUs: its CPU kernel has an AVX-512
    path and a scalar fallback, and on this project's AVX2 machine it measured 3–35× slower
    than a float32 matmul over the converted weights, `torch._int_mm` 2–25× slower than the
    exact float emulation of `int8_matmul`; so LLM.int8 uses `_int_mm` on CPU only when
    asked (docs/quantization.md)."""
    if name not in INT8_BACKENDS:
        raise UsageError(f"int8 backend {name!r}: allowed {', '.join(INT8_BACKENDS)}")
    _settings["int8_backend"] = name


def _probe_operands() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded float activations [3, 64], int8 weights [8, 64] and row scales, to check a
    kernel against a reference once before trusting it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g)
    q = torch.randint(-127, 128, (8, 64), generator=g, dtype=torch.int8)
    return x, q, torch.rand(8, generator=g) + 0.01


@functools.cache
def int8_kernel_works() -> bool:
    """`aten._weight_int8pack_mm` exists in this torch and agrees with a float64 reference."""
    try:
        op = torch.ops.aten._weight_int8pack_mm
    except (AttributeError, RuntimeError):
        return False
    x, q, s = _probe_operands()
    try:
        y = op(x, q, s)
    except RuntimeError:
        return False
    ref = x.double() @ (q.double() * s.double()[:, None]).t()
    return bool(torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4))


@functools.cache
def _vectorised_int8_cpu() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def use_int8_kernel(device: torch.device) -> bool:
    """Whether int8 products on `device` go through the PyTorch int8 kernels (CPU only)."""
    backend = _settings["int8_backend"]
    if device.type != "cpu" or backend == "dequant":
        return False
    if backend == "kernel":
        if not int8_kernel_works():
            raise UsageError("int8 backend 'kernel': this torch has no working int8 CPU kernel")
        return True
    return _vectorised_int8_cpu() and int8_kernel_works()


def int8_backend_name(device: torch.device | str = "cpu") -> str:
    return "kernel" if use_int8_kernel(torch.device(device)) else "dequant"


def int8_matmul(a: torch.Tensor, b: torch.Tensor, kernel: bool | None = None) -> torch.Tensor:
    """Exact int32 a @ b.T for int8 a [M, K] and b [N, K]: `torch._int_mm` (off CPU, or
    with the `kernel` backend), else float32 matmuls over K-chunks too short to round
    (EXACT_FP32_CHUNK), summed in int32."""
    if kernel is None:
        kernel = a.device.type != "cpu" or _settings["int8_backend"] == "kernel"
    if kernel:
        try:
            return torch._int_mm(a.contiguous(), b.t())
        except RuntimeError:  # shape limits of some devices (CUDA wants M > 16, K % 8 == 0)
            pass
    out = None
    for start in range(0, a.shape[1], EXACT_FP32_CHUNK):
        part = a[:, start : start + EXACT_FP32_CHUNK].float()
        part = part @ b[:, start : start + EXACT_FP32_CHUNK].float().t()
        part = part.to(torch.int32)
        out = part if out is None else out + part
    return out


# FBGEMM's AVX2 int8 kernel multiplies unsigned 8-bit activations by signed 8-bit weights
# and adds neighbouring products in saturating int16; with activations kept to 7 bits
# (0..127, "reduce_range") no pair can overflow, so the product is exact integer arithmetic.
# CPUs with AVX512-VNNI accumulate straight into int32 and take all 8 bits exactly.
ACT_QMAX_SAFE, ACT_QMAX_FULL = 127, 255


@functools.cache
def w8a8_activation_qmax() -> int:
    """255 where FBGEMM multiplies 8-bit activations exactly on this CPU, else 127.

    Probed with the worst case for int16 saturation (every code 255 against weights of
    127), not read from CPU flags: the kernel FBGEMM dispatches to is what counts."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return ACT_QMAX_SAFE
    x = torch.ones(2, 256)
    x[0, 0] = 0.0
    q = torch.full((4, 256), 127, dtype=torch.int8)
    s = torch.full((4,), 0.01)
    try:
        y = torch.ops.quantized.linear_dynamic(x, _pack_w8a8(q, s), False)
    except (RuntimeError, AttributeError):
        return ACT_QMAX_SAFE
    exact = torch.allclose(y, w8a8_reference(x, q, s, ACT_QMAX_FULL), rtol=1e-6, atol=1e-4)
    return ACT_QMAX_FULL if exact else ACT_QMAX_SAFE


@functools.cache
def w8a8_kernel_works() -> bool:
    """PyTorch's FBGEMM dynamic int8 linear exists here and agrees with `w8a8_reference`."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    x, q, s = _probe_operands()
    try:
        y = w8a8_kernel(x, _pack_w8a8(q, s), ACT_QMAX_SAFE)
    except (RuntimeError, AttributeError):
        return False
    ref = w8a8_reference(x, q, s, ACT_QMAX_SAFE)
    return bool(torch.allclose(y, ref, rtol=1e-4, atol=1e-4))


def _pack_w8a8(qweight: torch.Tensor, scale: torch.Tensor) -> Any:
    """FBGEMM's packed form of int8 weights with per-output-channel scales (built at load
    time, never saved: the checkpoint keeps plain int8 + scales)."""
    zeros = torch.zeros(qweight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated; the kernel is not
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(qweight.cpu(), scale.double().cpu(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qw, None)


# FBGEMM's packed weights are a TorchScript object that torch.compile cannot trace; a
# compiled graph reaches them through this operator, by handle (an int, registered while
# the owning module or group lives).
_PACKED: dict[int, Any] = {}
_HANDLES = itertools.count(1)
_LIB = torch.library.Library("lmlab", "DEF")
_LIB.define("w8a8_linear(Tensor x, int handle, int n) -> Tensor")


def _w8a8_linear(x: torch.Tensor, handle: int, n: int) -> torch.Tensor:
    return w8a8_kernel(x, _PACKED[handle])


def _w8a8_linear_fake(x: torch.Tensor, handle: int, n: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


_LIB.impl("w8a8_linear", _w8a8_linear, "CPU")
torch.library.register_fake("lmlab::w8a8_linear", _w8a8_linear_fake, lib=_LIB)


def _register_packed(owner: object, packed: Any) -> int:
    """A handle for `packed`, dropped when `owner` is collected (or `_release`d)."""
    handle = next(_HANDLES)
    _PACKED[handle] = packed
    weakref.finalize(owner, _PACKED.pop, handle, None)
    return handle


def _release(handle: int) -> None:
    _PACKED.pop(handle, None)


def w8a8_kernel(x: torch.Tensor, packed: Any, qmax: int | None = None) -> torch.Tensor:
    """x [M, K] float32 → x @ Wᵀ through FBGEMM: the whole of x quantized to asymmetric
    codes 0..qmax (default `w8a8_activation_qmax()`) with one scale, int32 accumulation,
    float32 out."""
    qmax = qmax or w8a8_activation_qmax()
    return _linear_dynamic()(x, packed, qmax == ACT_QMAX_SAFE)


@functools.cache
def _linear_dynamic() -> Any:
    """FBGEMM's dynamic linear as the bare C++ operator. The `torch.ops` packet first scans
    its arguments for fake script objects in generator expressions; run inside a compiled
    graph called from a function, each such generator frame was measured at ~17 µs, which
    made the compiled batch-1 w8a8 step slower than eager (35 against 50 tok/s, 74 with
    the bare operator). Real packed weights never need that scan."""
    packet = torch.ops.quantized.linear_dynamic
    return getattr(packet, "_op", packet)


def _act_qparams(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and zero point FBGEMM's dynamic linear picks for x: the range [min, max]
    widened to include 0, spread over 0..qmax."""
    lo = torch.clamp(x.min(), max=0.0).double()
    hi = torch.clamp(x.max(), min=0.0).double()
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale.float(), zero.float()


def w8a8_reference(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, qmax: int | None = None
) -> torch.Tensor:
    """What `w8a8_kernel` computes, in plain float arithmetic: the reference the kernel is
    checked against and the path off CPU (or without FBGEMM)."""
    qmax = qmax or w8a8_activation_qmax()
    sx, zx = _act_qparams(x, qmax)
    xq = torch.clamp(torch.round(x / sx) + zx, 0, qmax)
    acc = (xq - zx).double() @ qweight.double().t()  # exact: integers below 2^53
    return (acc * (sx.double() * scale.double()[None, :])).float()


# --- modules -----------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """What the quantized linears share: the shape and a full-precision bias."""

    method = ""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _finish(self, y: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def quantized_bytes(self) -> int:
        """Bytes of the quantized weight and its scales (the bias is not counted)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + (
            f"bias={self.bias is not None}"
        )


class Int8Linear(QuantLinear):
    """y = x · (q·s)ᵀ: int8 weight [N, K] and one scale per output row."""

    method = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))

    def dequantized(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features)
        if use_int8_kernel(x.device) and x2.dtype in (torch.float32, torch.bfloat16):
            y = torch.ops.aten._weight_int8pack_mm(
                x2.contiguous(), self.qweight, self.scale.to(x2.dtype)
            )
        else:  # the scale is per output row, so it applies after the matmul
            y = F.linear(x2, self.qweight.to(x2.dtype)) * self.scale.to(x2.dtype)
        return self._finish(y, shape, dtype)


class Int4Linear(QuantLinear):
    """Packed 4-bit codes [N, K/2] with a float16 scale and minimum per group of inputs."""

    method = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int) -> None:
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
        )
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("mins", torch.zeros(out_features, groups, dtype=torch.float16))

    def dequantized(self) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scales, self.mins, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Unpacked per call: the float weight lives only for this matmul.
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features)
        y = F.linear(x2, self.dequantized().to(x2.dtype))
        return self._finish(y, shape, dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


class LLMInt8Linear(QuantLinear):
    """LLM.int8(): int8 weights per output channel as `Int8Linear`; at forward time the
    input columns with |x| > threshold in any row use the dequantized weight columns in
    float, the rest int8 × int8 → int32 with per-row activation scales.

    The original float weights are not kept: which columns carry outliers is only known
    from activations, so the float part multiplies by q·s, the same weight every other path
    sees. `outlier_columns` / `columns_seen` count what the decomposition did."""

    method = "llm_int8"

    def __init__(self, in_features: int, out_features: int, bias: bool, threshold: float) -> None:
        super().__init__(in_features, out_features, bias)
        self.threshold = threshold
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.outlier_columns = 0
        self.columns_seen = 0

    def dequantized(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features).float()
        y, cols = llm_int8_matmul(x2, self.qweight, self.scale, self.threshold)
        self.outlier_columns += int(cols.numel())
        self.columns_seen += self.in_features
        return self._finish(y, shape, dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", threshold={self.threshold}"


class W8A8Linear(QuantLinear):
    """int8 × int8 products with float32 results: y = (x / s) · (q·scale)ᵀ + x_o · W_oᵀ.

    `smooth` (s, one per input channel) divides the activations and was multiplied into
    the weights before they were rounded, so the product is unchanged while the
    activations' outlier channels shrink. `outlier_cols` are the input channels that
    calibration found largest even after smoothing: their weights (`outlier_weight`, in
    smoothed units) stay in float and their activations skip the int8 product. The rest
    runs per token (each token's own activation range) through FBGEMM's kernel."""

    method = "w8a8"

    def __init__(self, in_features: int, out_features: int, bias: bool, outliers: int) -> None:
        super().__init__(in_features, out_features, bias)
        k = min(outliers, in_features)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("smooth", torch.ones(in_features))
        self.register_buffer("outlier_cols", torch.zeros(k, dtype=torch.long))
        self.register_buffer("outlier_weight", torch.zeros(out_features, k))
        self._packed: tuple | None = None
        self._handle = 0  # the packed weights' handle for compiled graphs (0: none)
        self._group: W8A8Group | None = None  # siblings reading the same input, fused
        self._group_slot = 0

    def dequantized(self) -> torch.Tensor:
        """The effective float weight in the input's own units (smoothing undone)."""
        w = dequantize_int8(self.qweight, self.scale)
        w[:, self.outlier_cols] = self.outlier_weight
        return w / self.smooth[None, :]

    def _prepared(self) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What the forward multiplies by, derived from the buffers on first use and again
        after a load or `.to()` (the hooks below): FBGEMM's packed weights (None off CPU),
        the rows' sums of the int8 weight × scale, 1/s with the outlier channels zeroed,
        and the outlier weights divided by their s (so they take x as it comes) as [k, N]
        (None without outlier channels): a [1, k] × [k, N] product runs about twice as
        fast as one against [N, k]ᵀ."""
        if self._packed is None:
            # a group member's product runs through the group's packed weights instead
            packed = None
            if self._group is None and self._kernel():
                packed = _pack_w8a8(self.qweight, self.scale)
            row_sums = self.qweight.float().sum(dim=1) * self.scale
            inv = 1.0 / self.smooth
            inv[self.outlier_cols] = 0.0
            w_out = self.outlier_weight / self.smooth[self.outlier_cols][None, :]
            w_out = w_out.t().contiguous() if self.outlier_cols.numel() else None
            self._packed = (packed, row_sums, inv, w_out)
            if packed is not None:
                self._handle = _register_packed(self, packed)
        return self._packed

    def _kernel(self) -> bool:
        return self.qweight.device.type == "cpu" and w8a8_kernel_works()

    def _forget(self) -> None:
        self._packed = None
        _release(self._handle)
        self._handle = 0
        if self._group is not None:
            self._group.forget()

    def _apply(self, fn, recurse=True):  # .to(), .float(), ...: derive again on next use
        self._forget()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._forget()
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        if self._group is not None:
            y = self._group.output(x, self._group_slot)
        else:
            x2 = x.reshape(-1, self.in_features)
            y = _w8a8_product(x2, self._prepared(), self._handle, self)
        if self.bias is not None:
            y = y + self.bias
        y = y.reshape(*shape[:-1], self.out_features)
        return y if y.dtype == dtype else y.to(dtype)

    def __getstate__(self) -> dict:  # copies re-derive the kernel weights (not picklable)
        return {**self.__dict__, "_packed": None, "_handle": 0}

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.qweight, self.scale

    def extra_repr(self) -> str:
        return super().extra_repr() + f", outliers={self.outlier_cols.numel()}"


def _w8a8_product(x2: torch.Tensor, prepared: tuple, handle: int, source: Any) -> torch.Tensor:
    """x2 [M, K] → [M, N] without the bias: the int8 product of the smoothed activations
    (per token) plus the float product of the outlier channels. `source` (the linear or
    its group) gives the outlier channels and the plain int8 weights, read only where
    used: each tensor a compiled graph reads is one more guard checked on every call (the
    decode step's guards took ~10% of it when every product read all of them)."""
    packed, row_sums, inv, w_out = prepared
    if x2.dtype != torch.float32:
        x2 = x2.float()
    xo = x2.index_select(1, source.outlier_cols) if w_out is not None else None
    x2 = x2 * inv  # smoothed, outlier channels zeroed
    rows = x2.shape[0]
    if rows > 1:
        # The kernel quantizes the whole batch with one scale. Each token's own range
        # [lo, hi] is first mapped onto [0, 1], so every token gets every code; the shift
        # is undone exactly after: W·(lo·1) = lo · (row sums of W). (Onto [0, 1], not
        # [-1, 1]: there the zero point sits on a rounding tie, 127.5.) A single row (a
        # decode step at batch 1) is its own range already: the same step size.
        # amin and amax apart: aminmax over rows measured 2-50x slower on CPU
        lo, hi = x2.amin(dim=1, keepdim=True), x2.amax(dim=1, keepdim=True)
        span = (hi - lo).clamp_min(1e-30)
        x2 = x2.sub_(lo).div_(span)  # in place: x2 is this function's own copy
    if packed is None:
        y = w8a8_reference(x2, *source.int8_weight())
    elif handle and torch.compiler.is_compiling():
        y = torch.ops.lmlab.w8a8_linear(x2, handle, source.out_features)
    else:
        y = w8a8_kernel(x2, packed)
    if rows > 1:
        y = y.mul_(span).addcmul_(lo, row_sums[None, :])
    if xo is not None:  # the outlier channels, in float
        y = torch.addmm(y, xo, w_out)
    return y


# Linears of one block that read the same input: one int8 product serves them all.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def sibling_groups(names: list[str]) -> list[list[str]]:
    """Groups of quantized linears that read one input (q/k/v, gate/up of a block), every
    member present in `names`."""
    present, groups = set(names), []
    for name in names:
        parent, _, leaf = name.rpartition(".")
        for kind in SIBLINGS:
            if leaf == kind[0]:
                members = [f"{parent}.{m}" if parent else m for m in kind]
                if all(m in present for m in members):
                    groups.append(members)
    return groups


class W8A8Group:
    """W8A8 siblings (same smoothing, same outlier channels) run as one int8 product: the
    first member called with an input computes every member's output and keeps it for the
    others, keyed by the input tensor itself (held, so its memory cannot be reused by
    another tensor meanwhile) and its version. A member called with another input (cross-
    attention's keys and values read the encoder's output) computes the product for that
    input. Three calls of FBGEMM's kernel become one, at the same arithmetic."""

    def __init__(self, members: list[W8A8Linear]) -> None:
        self.members = members
        starts = [0]
        for m in members:
            starts.append(starts[-1] + m.out_features)
        self.slices = [slice(a, b) for a, b in zip(starts, starts[1:], strict=False)]
        self.out_features = starts[-1]
        self._prepared: tuple | None = None
        self._handle = 0
        self._cache: tuple | None = None  # (input, its version, outputs, members served)

    def forget(self) -> None:
        self._prepared = self._cache = None
        _release(self._handle)
        self._handle = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_prepared": None, "_cache": None, "_handle": 0}

    def prepared(self) -> tuple:
        if self._prepared is None:
            ms = self.members
            first = ms[0]
            for m in ms[1:]:
                if not (
                    torch.equal(m.smooth, first.smooth)
                    and torch.equal(m.outlier_cols, first.outlier_cols)
                ):
                    raise CheckpointError(
                        "w8a8 siblings were quantized with different smoothing or outlier "
                        "channels; their checkpoint cannot run them as one product"
                    )
            qweight = torch.cat([m.qweight for m in ms])
            scale = torch.cat([m.scale for m in ms])
            parts = [m._prepared() for m in ms]
            w_out = torch.cat([p[3] for p in parts], dim=1) if parts[0][3] is not None else None
            packed = _pack_w8a8(qweight, scale) if first._kernel() else None
            row_sums = torch.cat([p[1] for p in parts])
            self._prepared = ((packed, row_sums, parts[0][2], w_out), qweight, scale)
            if packed is not None:
                self._handle = _register_packed(self, packed)
        return self._prepared

    @property
    def outlier_cols(self) -> torch.Tensor:
        return self.members[0].outlier_cols

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        _, qweight, scale = self.prepared()
        return qweight, scale

    def _product(self, x2: torch.Tensor) -> torch.Tensor:
        return _w8a8_product(x2, self.prepared()[0], self._handle, self)

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every member's output (bias included) for input x, from one product. Attention
        and MLP call this when their projections form the group: no caching by input, so
        it traces under torch.compile."""
        y = self._product(x.reshape(-1, self.members[0].in_features))
        outs = []
        for m, part in zip(self.members, self.slices, strict=True):
            o = y[:, part]
            if m.bias is not None:
                o = o + m.bias
            o = o.reshape(*x.shape[:-1], m.out_features)
            outs.append(o if o.dtype == x.dtype else o.to(x.dtype))
        return outs

    def output(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """Member `slot`'s output [M, N_slot] (no bias) for input x."""
        c = self._cache
        if c is None or c[0] is not x or c[1] != x._version or slot in c[3]:
            y = self._product(x.reshape(-1, self.members[0].in_features))
            c = self._cache = (x, x._version, y, set())
        c[3].add(slot)
        if len(c[3]) == len(self.members):
            self._cache = None  # every member served: let the input go
        return c[2][:, self.slices[slot]]


def link_groups(model: nn.Module, groups: list[list[str]]) -> None:
    """Run each group of W8A8 siblings as one product (see `W8A8Group`)."""
    for names in groups:
        members = [model.get_submodule(n) for n in names]
        if all(isinstance(m, W8A8Linear) for m in members):
            group = W8A8Group(members)
            for slot, m in enumerate(members):
                m._group, m._group_slot = group, slot


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^α / max|W_j|^(1−α) per input channel j; a channel that
    calibration never saw active (or whose weights are all zero) keeps s = 1."""
    xa = act_absmax.float()
    wa = weight.detach().float().abs().amax(dim=0)
    s = xa.clamp_min(1e-5) ** alpha / wa.clamp_min(1e-5) ** (1 - alpha)
    return torch.where((xa > 0) & (wa > 0), s, torch.ones_like(s))


@torch.no_grad()
def activation_absmax(model: nn.Module, names: list[str], batches: Any) -> dict[str, torch.Tensor]:
    """Per input channel, the largest |activation| reaching each named linear over the
    calibration `batches` (token-id tensors [B, T] run through the model)."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(mod: nn.Module, inp: tuple, out: Any) -> None:
            a = inp[0].detach().reshape(-1, inp[0].shape[-1]).abs().amax(dim=0).float()
            stats[name] = torch.maximum(stats[name], a) if name in stats else a

        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for ids in batches:
            if getattr(model.cfg, "family", "") == "encoder_decoder":
                model(ids, ids)
            else:
                model(ids)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in stats]
    if missing:
        raise UsageError(f"calibration never reached {missing[0]} (no calibration tokens?)")
    return stats


def _quantize_w8a8(
    lin: nn.Linear,
    act_absmax: torch.Tensor,
    alpha: float,
    outliers: int,
    siblings: list[nn.Linear] | None = None,
):
    """One W8A8 layer; with `siblings` (the linears reading the same input, itself
    included) the smoothing and the outlier channels are the group's, as SmoothQuant
    smooths q/k/v together, so the group can run as one product."""
    k, n, bias = lin.in_features, lin.out_features, lin.bias is not None
    mod = W8A8Linear(k, n, bias, outliers)
    weights = torch.cat([m.weight.detach() for m in siblings or [lin]])
    s = smoothing_factors(act_absmax, weights, alpha)
    w = lin.weight.detach().float() * s[None, :]
    cols = torch.topk(act_absmax.float() / s, mod.outlier_cols.numel()).indices.sort().values
    mod.outlier_cols = cols
    mod.outlier_weight = w[:, cols].clone()
    w[:, cols] = 0.0  # their range no longer sets the row's int8 scale
    mod.qweight, mod.scale = quantize_int8(w)
    mod.smooth = s
    if bias:
        mod.bias.data = lin.bias.detach().float().clone()
    return mod.to(lin.weight.device)


def llm_int8_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    threshold: float,
    kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x @ Wᵀ with the mixed decomposition, outlier column indices); x float [M, K]."""
    outliers = (x.abs() > threshold).any(dim=0)
    cols = outliers.nonzero().flatten()
    regular = x.masked_fill(outliers, 0.0) if cols.numel() else x
    sx = regular.abs().amax(dim=1, keepdim=True) / 127.0
    sx = torch.where(sx > 0, sx, torch.ones_like(sx))
    xq = torch.round(regular / sx).clamp(-127, 127).to(torch.int8)
    acc = int8_matmul(xq, qweight, kernel)
    y = acc.float() * sx * scale.float()[None, :]  # the outer product of the two scales
    if cols.numel():
        w_cols = qweight[:, cols].float() * scale.float()[:, None]
        y = y + x[:, cols] @ w_cols.t()
    return y, cols


def _quantize_linear(lin: nn.Linear, method: str, group_size: int, threshold: float) -> QuantLinear:
    k, n, bias = lin.in_features, lin.out_features, lin.bias is not None
    w = lin.weight.detach()
    if method == "int4":
        mod: QuantLinear = Int4Linear(k, n, bias, group_size)
        mod.qweight, mod.scales, mod.mins = quantize_int4(w, group_size)
    else:
        mod = Int8Linear(k, n, bias) if method == "int8" else LLMInt8Linear(k, n, bias, threshold)
        mod.qweight, mod.scale = quantize_int8(w)
    if bias:
        mod.bias.data = lin.bias.detach().float().clone()
    return mod.to(w.device)


def _empty_linear(
    lin: nn.Linear, method: str, group_size: int, threshold: float, outliers: int = 0
) -> QuantLinear:
    k, n, bias = lin.in_features, lin.out_features, lin.bias is not None
    if method == "w8a8":
        return W8A8Linear(k, n, bias, outliers)
    if method == "int4":
        return Int4Linear(k, n, bias, group_size)
    return Int8Linear(k, n, bias) if method == "int8" else LLMInt8Linear(k, n, bias, threshold)


# --- which modules -----------------------------------------------------------------------


def check_options(
    method: str, group_size: int, threshold: float, alpha: float = 0.5, outliers: int = 0
) -> None:
    if method == "w8a8":
        if not (isinstance(alpha, int | float) and 0 <= alpha <= 1):
            raise UsageError(f"alpha {alpha!r}: SmoothQuant's migration strength lies in [0, 1]")
        if not (isinstance(outliers, int) and outliers >= 0):
            raise UsageError(f"outliers {outliers!r}: a number of float input channels, ≥ 0")
    if method not in METHODS:
        raise UsageError(f"method {method!r}: allowed {', '.join(METHODS)}")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise UsageError(
            f"group size {group_size!r}: int4 groups hold "
            f"{', '.join(map(str, GROUP_SIZES))} input weights"
        )
    if method == "llm_int8" and not (
        isinstance(threshold, int | float) and math.isfinite(threshold) and threshold > 0
    ):
        raise UsageError(
            f"threshold {threshold!r}: LLM.int8 needs a positive outlier magnitude (paper: 6.0)"
        )


def quantizable(model: nn.Module, include_lm_head: bool = False) -> list[str]:
    """Names of the linears to quantize: all but `lm_head` (unless asked) and MoE routers,
    whose few weights decide which expert runs (a flipped choice costs more than it saves)."""
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if (name == "lm_head" and not include_lm_head) or name.split(".")[-1] == "router":
            continue
        names.append(name)
    return names


def _check_groups(model: nn.Module, names: list[str], group_size: int) -> None:
    dims = {name: model.get_submodule(name).in_features for name in names}
    bad = [(n, k) for n, k in dims.items() if k % group_size]
    if bad:
        fits = [g for g in GROUP_SIZES if all(k % g == 0 for k in dims.values())]
        name, k = bad[0]
        raise UsageError(
            f"group size {group_size} does not divide the input dimension {k} of {name} "
            f"(int4 groups run along the input dim); group sizes that fit this model: "
            f"{', '.join(map(str, fits)) or 'none'}"
        )


def _spec(method: str, group_size: int, threshold: float, names: list[str], lm_head: bool):
    return {
        "format": QUANT_FORMAT,
        "method": method,
        "bits": 4 if method == "int4" else 8,
        "group_size": group_size if method == "int4" else None,
        "threshold": float(threshold) if method == "llm_int8" else None,
        "include_lm_head": lm_head,
        "modules": names,
    }


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    method: str,
    group_size: int = 64,
    threshold: float = 6.0,
    include_lm_head: bool = False,
    calibration: Any = None,
    alpha: float = 0.5,
    outliers: int = 32,
) -> nn.Module:
    """Replace the model's linears (see `quantizable`) in place by quantized modules; the
    model remembers what was done in `model.quantization` (what the checkpoint records).

    `w8a8` needs `calibration`: token-id batches [B, T] to run through the model first
    (`activation_absmax`), or that function's result. `alpha` is SmoothQuant's migration
    strength, `outliers` the input channels per layer kept in float."""
    check_options(method, group_size, threshold, alpha, outliers)
    if getattr(model, "quantization", None):
        raise UsageError(
            f"the model is already quantized ({model.quantization['method']}); "
            "quantize the full-precision checkpoint instead"
        )
    names = quantizable(model, include_lm_head)
    if not names:
        raise UsageError("the model has no nn.Linear layers to quantize")
    if method == "int4":
        _check_groups(model, names, group_size)
    if method == "w8a8":
        if calibration is None:
            raise UsageError("w8a8 needs calibration data (its smoothing and outlier channels)")
        stats = calibration
        if not isinstance(calibration, dict):
            stats = activation_absmax(model, names, calibration)
    groups = sibling_groups(names) if method == "w8a8" else []
    group_of = {n: g for g in groups for n in g}
    originals = {n: model.get_submodule(n) for n in names}
    for name in names:
        lin = originals[name]
        if method == "w8a8":
            members = group_of.get(name, [name])
            act = torch.stack([stats[m] for m in members]).amax(dim=0)
            sibs = [originals[m] for m in members]
            q = _quantize_w8a8(lin, act, alpha, outliers, sibs)
        else:
            q = _quantize_linear(lin, method, group_size, threshold)
        model.set_submodule(name, q)
    model.quantization = _spec(method, group_size, threshold, names, include_lm_head)
    if method == "w8a8":
        model.quantization.update(alpha=float(alpha), outliers=outliers, groups=groups)
        link_groups(model, groups)
    return model


def prepare_quantized(model: nn.Module, spec: Any, where: str | Path) -> None:
    """Give a freshly built model the empty quantized modules a checkpoint's `quantization`
    block names, so its state dict loads into them (`load_model` calls this)."""

    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{where}: quantization: {msg}")

    if not isinstance(spec, dict):
        raise bad(f"expected an object, got {type(spec).__name__}")
    method = spec.get("method")
    if method not in METHODS:
        raise bad(f"method {method!r} is not one of {', '.join(METHODS)}")
    group_size, threshold = spec.get("group_size"), spec.get("threshold")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise bad(f"group_size {group_size!r} is not one of {GROUP_SIZES}")
    if method == "llm_int8" and not (isinstance(threshold, int | float) and threshold > 0):
        raise bad(f"threshold {threshold!r} is not a positive number")
    outliers = spec.get("outliers", 0)
    if method == "w8a8" and not (isinstance(outliers, int) and outliers >= 0):
        raise bad(f"outliers {outliers!r} is not a number of channels")
    names = spec.get("modules")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise bad("modules must be a non-empty list of module names")
    for name in names:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise bad(f"module {name!r} is not in this model (does config.json match?)") from None
        if not isinstance(lin, nn.Linear):
            raise bad(f"module {name!r} is a {type(lin).__name__}, not a linear layer")
        if method == "int4" and lin.in_features % group_size:
            raise bad(f"{name}: input dim {lin.in_features} is not a multiple of {group_size}")
        model.set_submodule(
            name, _empty_linear(lin, method, group_size or 0, threshold or 0.0, outliers or 0)
        )
    groups = spec.get("groups") or []
    if method == "w8a8":
        ok = isinstance(groups, list) and all(
            isinstance(g, list) and len(g) > 1 and all(n in names for n in g) for g in groups
        )
        if not ok:
            raise bad("groups must be lists of two or more of the quantized modules")
        link_groups(model, groups)
    model.quantization = dict(spec)


def check_quantized_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Every tensor present with the shape (and, for quantized modules, the dtype) the model
    expects: `load_state_dict` would cast a float tensor into an int8 buffer silently."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"{where}: tensors do not match the quantized model ({what})")
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for key, ref in expected.items():
        got = state[key]
        if got.shape != ref.shape:
            raise CheckpointError(
                f"{where}: {key} has shape {list(got.shape)}, the model needs {list(ref.shape)}"
            )
        if key.rsplit(".", 1)[0] in quant and got.dtype != ref.dtype:
            raise CheckpointError(
                f"{where}: {key} is {str(got.dtype).removeprefix('torch.')}, a "
                f"{model.quantization['method']} checkpoint stores "
                f"{str(ref.dtype).removeprefix('torch.')}"
            )


def save_quantized(
    model: nn.Module,
    out: str | Path,
    tokenizer_dir: str | Path | None = None,
    extra: dict | None = None,
    write_extra=None,
    kind: str | None = None,
) -> Path:
    """Write a quantized model as an lmlab checkpoint with its `quantization` block."""
    spec = getattr(model, "quantization", None)
    if not spec:
        raise UsageError("save_quantized: the model is not quantized (call quantize_model)")
    extra = {**(extra or {}), "quantization": spec}
    return save_checkpoint(
        model, out, tokenizer_dir, extra=extra, write_extra=write_extra, kind=kind
    )


def load_quantized(ckpt: Path, device: str = "cpu") -> nn.Module:
    """The quantized model of the checkpoint directory `ckpt`: the empty quantized modules its
    `quantization` block names, then its tensors, each checked for shape and dtype. A tied
    `lm_head` that stayed in full precision shares the embedding."""
    raw = read_config(ckpt)
    model = build_model(ModelConfig.from_dict(raw["model"]))
    prepare_quantized(model, raw["quantization"], ckpt / "config.json")
    weights = ckpt / "model.safetensors"
    state = read_weights(weights)
    tied = model.cfg.tie_embeddings and isinstance(getattr(model, "lm_head", None), nn.Linear)
    if tied and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    check_quantized_state(model, state, weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{weights}: weights do not match config.json ({detail})") from None
    return model.to(device).eval()


# --- what quantization changed -----------------------------------------------------------


@torch.no_grad()
def weight_error(fp: nn.Module, quantized: nn.Module, names: list[str]) -> float:
    """‖W − Ŵ‖ / ‖W‖ over all quantized matrices together (Frobenius norms)."""
    err = ref = 0.0
    for name in names:
        w = fp.get_submodule(name).weight.float()
        err += (quantized.get_submodule(name).dequantized() - w).pow(2).sum().item()
        ref += w.pow(2).sum().item()
    return math.sqrt(err / ref) if ref else 0.0


def outlier_share(model: nn.Module) -> float | None:
    """Share of LLM.int8 input columns multiplied in float over every forward since the
    layers were built."""
    mods = [m for m in model.modules() if isinstance(m, LLMInt8Linear)]
    seen = sum(m.columns_seen for m in mods)
    return sum(m.outlier_columns for m in mods) / seen if seen else None
