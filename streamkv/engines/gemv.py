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
`linear="triton_fused"`), when the call right after a one-row linear is F.gelu (exact, not tanh) or
F.silu (not in place) on that linear's output, the mode returns one_row_linear with the activation
applied to the accumulator: the same function, one rounding fewer. The plain product it returned first
then has no use left, and Inductor drops it from the compiled step (eager, it is computed and unused).
Any other call in between, an in-place one on that output included, cancels the fusion. Not yet timed on
a GPU, so not the default.

Kernel: program p computes rows [p·BLOCK_N, (p+1)·BLOCK_N) of y = W·x + b, W [out, in] row-major (nn.Linear's
layout, so each row streams contiguously): products accumulate in fp32 (float64 for float64 tensors)
across a BLOCK_N × BLOCK_K tile, summed once at the end; no split over `in`, so no second pass and the same
bits on every run. Small BLOCK_N keeps every SM busy on the narrow matrices (2560 rows: 1280 programs).
Tiles per shape: TILES, the probe's best on an H100. On CPU it runs only under Triton's interpreter
(TRITON_INTERPRET=1), which is how tests/test_gemv.py checks it against float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .triton_support import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gemv(x_ptr, w_ptr, b_ptr, y_ptr, n_out, n_in, stride_w, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # The work dtype follows the output's, so callers pass only ints and bools.
        work = tl.float64 if y_ptr.dtype.element_ty == tl.float64 else tl.float32
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=work)
        for start in range(0, n_in, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + cols, mask=cols < n_in, other=0.0).to(work)
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           shape: dict | None = None, activation: int = NO_ACTIVATION) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., in] holding one row, then the ACTIVATIONS entry `activation`;
    `shape` overrides tile() (the probe's grid)."""
    n_out, n_in = weight.shape
    y = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
    shape = shape or tile(n_out, n_in)
    _gemv[(triton.cdiv(n_out, shape["BLOCK_N"]),)](
        x.reshape(n_in), weight, weight if bias is None else bias, y, n_out, n_in, weight.stride(0),
        HAS_BIAS=bias is not None, ACTIVATION=activation, **shape)
    return y


@torch.library.custom_op("streamkv::one_row_linear", mutates_args=())
def one_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: int) -> torch.Tensor:
    """`linear` as one opaque operator: torch.compile calls it as it is, where a Triton launch in the step
    would be traced and analysed at each of the step's 129 linears (stop 28: the step with the kernel
    launched directly did not finish compiling and running in 145 s, the default's in about 100). Under
    Triton's interpreter (CPU), tracing the launch fails outright; the operator compiles there too."""
    return linear(x, weight, bias, activation=activation)


@one_row_linear.register_fake
def _(x, weight, bias, activation):
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


class OneRowLinears(TorchFunctionMode):
    """Inside it, F.linear on one row runs `linear`, with `fuse_activations` fused with an activation called
    on its output right after (module doc); everything else runs as it would."""

    def __init__(self, fuse_activations: bool = False):
        super().__init__()
        self.fuse_activations = fuse_activations
        self.pending = None   # (output, x, weight, bias) of a one-row linear, for the very next call only

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        pending, self.pending = self.pending, None
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if one_row(x, weight):
                y = one_row_linear(x, weight, bias, NO_ACTIVATION)
                if self.fuse_activations:
                    self.pending = (y, x, weight, bias)
                return y
        elif pending is not None and args and args[0] is pending[0]:
            activation = fusable(func, args, kwargs)
            if activation is not None:
                return one_row_linear(*pending[1:], activation)
        return func(*args, **kwargs)
