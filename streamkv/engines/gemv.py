"""One-row linears as a Triton GEMV: the fast engine's `linear="triton"`.

Why: a decode step multiplies one row by every weight matrix, and cuBLAS's kernels for that shape ran at
1.21-1.95x their byte floor on an H100, where this kernel ran at 1.14-1.56x (scripts/probe_gemv.py,
docs/bench/h100_probe_gemv.json: Pythia-2.8B's four shapes, 32 layers' weights in one CUDA graph; about
250 µs a step less over the model's 128 linears). The whole captured step gained 241 µs on an H100
(docs/bench/h100_bench_gemv_stop29.json), so it is the fast engine's default on CUDA (fast.default_linear).

How the model reaches it without patching it: `OneRowLinears`, a TorchFunctionMode the fast engine enters
around each decode step's forward, sends every F.linear whose input holds one row to `one_row_linear`
(`linear` as one opaque operator, which torch.compile calls without tracing the launch), and every other
call (the prefill's) to F.linear unchanged.

Activations in the kernel. An MLP's first linear is followed at once by its activation (GPT-NeoX:
gelu(dense_h_to_4h(x)); Llama: silu(gate_proj(x))), on the step's profile a kernel of its own a layer
(GELU: 1.1 µs on an H100, docs/bench). With `fuse_activations` (the fast engine's
`linear="triton_activation"` and `"triton_fused"`), when the call right after a one-row linear is F.gelu
(exact, not tanh) or F.silu (not in place) on that linear's output, the mode returns one_row_linear with the
activation applied to the accumulator: the same function, one rounding fewer. The plain product it returned
first then has no use left, and Inductor drops it from the compiled step (eager, it is computed and unused).
Any other call in between, an in-place one on that output included, cancels the fusion.

Layer norms in the kernel. GPT-NeoX feeds the residual stream through a layer norm into the attention's
query_key_value and the MLP's dense_h_to_4h; on the H100 step's profile a layer's residual add and its
norms are one reduction kernel, 3.5 µs a layer (110 µs a step): one program reduces 2560 features, a
latency, not a bandwidth, cost. With `fuse_norms` (`"triton_fused"`), when
a one-row linear's input is the output of the F.layer_norm called just before (attribute reads such as
`.shape` aside), the kernel is handed the norm's input and its weight, bias and eps instead: every program
computes the row's mean and variance itself (the row is 5 KB, read from cache) and normalises each tile it
multiplies, so the norm's output is never stored; the norm's own kernel then has no use left and Inductor
drops it; the residual add stays, a point-wise kernel. The final norm is not fused (the LM head's input
is sliced in between), nor is Llama's RMSNorm, which is not F.layer_norm. Neither fusion is timed on a GPU yet,
so neither is the default.

Kernel: program p computes rows [p·BLOCK_N, (p+1)·BLOCK_N) of y = W·x + b, W [out, in] row-major (nn.Linear's
layout, so each row streams contiguously): products accumulate in fp32 (float64 for float64 tensors)
across a BLOCK_N × BLOCK_K tile, summed once at the end; no split over `in`, so no second pass and the same
bits on every run. Small BLOCK_N keeps every SM busy on the narrow matrices (2560 rows: 1280 programs).
Tiles per shape: TILES, the probe's best on an H100. On CPU it runs only under Triton's interpreter
(TRITON_INTERPRET=1), which is how tests/test_gemv.py checks it against float64.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .triton_support import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gemv(x_ptr, w_ptr, b_ptr, y_ptr, g_ptr, beta_ptr, n_out, n_in, stride_w, eps, HAS_BIAS: tl.constexpr,
              ACTIVATION: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
        # The work dtype follows the output's, so callers pass only ints, bools and eps.
        work = tl.float64 if y_ptr.dtype.element_ty == tl.float64 else tl.float32
        if NORM:
            # The layer norm's statistics of x as F.layer_norm takes them (mean, then the biased variance),
            # from the whole row at once: every program needs them, and a row is a few KB.
            offs = tl.arange(0, NORM_BLOCK)
            row = tl.load(x_ptr + offs, mask=offs < n_in, other=0.0).to(work)
            mean = tl.sum(row, axis=0) / n_in
            centred = tl.where(offs < n_in, row - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_in + eps)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=work)
        for start in range(0, n_in, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + cols, mask=cols < n_in, other=0.0).to(work)
            if NORM:
                gain = tl.load(g_ptr + cols, mask=cols < n_in, other=0.0).to(work)
                shift = tl.load(beta_ptr + cols, mask=cols < n_in, other=0.0).to(work)
                x = (x - mean) * rstd * gain + shift
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :],
                        mask=(rows[:, None] < n_out) & (cols[None, :] < n_in), other=0.0).to(work)
            acc += w * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rows < n_out, other=0.0).to(work)
        if ACTIVATION == 1:   # GELU, exact: x · Φ(x) = x/2 · (1 + erf(x/√2))
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        elif ACTIVATION == 2:   # SiLU: x · σ(x)
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < n_out)


# (BLOCK_N, BLOCK_K, num_warps) per weight shape [out, in]: scripts/probe_gemv.py's best on an H100 for
# Pythia-2.8B's four (docs/bench/h100_probe_gemv.json); any other shape takes DEFAULT_TILE, the best of two.
TILES = {(7680, 2560): (1, 512, 2), (10240, 2560): (2, 512, 2), (2560, 2560): (2, 1024, 4),
         (2560, 10240): (2, 1024, 4)}
DEFAULT_TILE = (2, 1024, 4)


def tile(n_out: int, n_in: int) -> dict:
    block_n, block_k, num_warps = TILES.get((n_out, n_in), DEFAULT_TILE)
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": num_warps}


# The activations the kernel applies (its ACTIVATION), by the function the model calls.
NO_ACTIVATION = 0
ACTIVATIONS = {F.gelu: 1, F.silu: 2}


class Norm(NamedTuple):
    """A layer norm over a linear's input features, which the kernel applies to its row first (NORM)."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float


NO_NORM = (None, None, 0.0)   # one_row_linear's norm arguments for none


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           shape: dict | None = None, activation: int = NO_ACTIVATION, norm: Norm | None = None) -> torch.Tensor:
    """F.linear(norm(x), weight, bias) for x [..., in] holding one row, `norm` a layer norm over `in` or
    none, then the ACTIVATIONS entry `activation`; `shape` overrides tile() (the probe's grid)."""
    n_out, n_in = weight.shape
    y = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
    shape = shape or tile(n_out, n_in)
    gain, shift, eps = norm if norm is not None else (weight, weight, 0.0)   # unread without NORM
    _gemv[(triton.cdiv(n_out, shape["BLOCK_N"]),)](
        x.reshape(n_in), weight, weight if bias is None else bias, y, gain, shift, n_out, n_in, weight.stride(0),
        eps, HAS_BIAS=bias is not None, ACTIVATION=activation, NORM=norm is not None,
        NORM_BLOCK=triton.next_power_of_2(n_in) if norm is not None else 1, **shape)
    return y


@torch.library.custom_op("streamkv::one_row_linear", mutates_args=())
def one_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: int,
                   norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None,
                   eps: float = 0.0) -> torch.Tensor:
    """`linear` as one opaque operator: torch.compile calls it as it is, where a Triton launch in the step
    would be traced and analysed at each of the step's 129 linears (stop 28: the step with the kernel
    launched directly did not finish compiling and running in 145 s, the default's in about 100). Under
    Triton's interpreter (CPU), tracing the launch fails outright; the operator compiles there too.
    norm_weight given: x is a layer norm's input, and (norm_weight, norm_bias, eps) that norm."""
    norm = None if norm_weight is None else Norm(norm_weight, norm_bias, eps)
    return linear(x, weight, bias, activation=activation, norm=norm)


@one_row_linear.register_fake
def _(x, weight, bias, activation, norm_weight=None, norm_bias=None, eps=0.0):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def one_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """What `linear` takes: a single input row, a row-major weight with unit stride over `in`."""
    return x.numel() == x.shape[-1] and weight.dim() == 2 and weight.stride(1) == 1


def fusable(func, args, kwargs) -> int | None:
    """The ACTIVATIONS entry of this call if the kernel can apply it to args[0] (exact GELU, SiLU not in
    place), else None."""
    activation = ACTIVATIONS.get(func)
    options = dict(zip(("approximate",) if func is F.gelu else ("inplace",), args[1:]), **kwargs)
    if activation is None or options.get("approximate", "none") != "none" or options.get("inplace", False):
        return None
    return activation


def norm_of(args, kwargs) -> Norm | None:
    """The Norm of this F.layer_norm call if the kernel can apply it to its input: one row, normalised over
    its last dim alone, with a weight and a bias (GPT-NeoX's); else None."""
    call = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args), **kwargs)
    x, weight, bias = call["input"], call.get("weight"), call.get("bias")
    n = x.shape[-1]
    if tuple(call["normalized_shape"]) != (n,) or x.numel() != n or weight is None or bias is None:
        return None
    if weight.shape != (n,) or bias.shape != (n,) or not (weight.is_contiguous() and bias.is_contiguous()):
        return None
    return Norm(weight, bias, float(call.get("eps", 1e-5)))


class OneRowLinears(TorchFunctionMode):
    """Inside it, F.linear on one row runs `linear`; with `fuse_norms`, fused with a layer norm whose output it
    is called on right before, with `fuse_activations`, with an activation called on its output right after
    (module doc); everything else runs as it would."""

    def __init__(self, fuse_activations: bool = False, fuse_norms: bool = False):
        super().__init__()
        self.fuse_activations, self.fuse_norms = fuse_activations, fuse_norms
        # For the very next call only (attribute reads aside): a layer norm's (output, input, Norm), and a
        # one-row linear's (output, x, weight, bias, Norm or None).
        self.normed = self.product = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) == "__get__":
            # An attribute read (GPT-NeoX's attention reads its input's shape before its first linear):
            # it computes nothing, so it keeps what the next call may fuse.
            return func(*args, **kwargs)
        normed, product, self.normed, self.product = self.normed, self.product, None, None
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if one_row(x, weight):
                norm = None
                if normed is not None and x is normed[0]:
                    x, norm = normed[1], normed[2]
                y = one_row_linear(x, weight, bias, NO_ACTIVATION, *(norm or NO_NORM))
                if self.fuse_activations:
                    self.product = (y, x, weight, bias, norm)
                return y
        elif func is F.layer_norm and self.fuse_norms:
            norm = norm_of(args, kwargs)
            y = func(*args, **kwargs)
            if norm is not None:
                self.normed = (y, args[0] if args else kwargs["input"], norm)
            return y
        elif product is not None and args and args[0] is product[0]:
            activation = fusable(func, args, kwargs)
            if activation is not None:
                y, x, weight, bias, norm = product
                return one_row_linear(x, weight, bias, activation, *(norm or NO_NORM))
        return func(*args, **kwargs)
