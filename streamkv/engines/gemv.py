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
    def _gemv(x_ptr, w_ptr, b_ptr, y_ptr, n_out, n_in, stride_w, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
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
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < n_out)


# (BLOCK_N, BLOCK_K, num_warps) per weight shape [out, in]: scripts/probe_gemv.py's best on an H100 for
# Pythia-2.8B's four (docs/bench/h100_probe_gemv.json); any other shape takes DEFAULT_TILE, the best of two.
TILES = {(7680, 2560): (1, 512, 2), (10240, 2560): (2, 512, 2), (2560, 2560): (2, 1024, 4),
         (2560, 10240): (2, 1024, 4)}
DEFAULT_TILE = (2, 1024, 4)


def tile(n_out: int, n_in: int) -> dict:
    block_n, block_k, num_warps = TILES.get((n_out, n_in), DEFAULT_TILE)
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": num_warps}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           shape: dict | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., in] holding one row; `shape` overrides tile() (the probe's grid)."""
    n_out, n_in = weight.shape
    y = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
    shape = shape or tile(n_out, n_in)
    _gemv[(triton.cdiv(n_out, shape["BLOCK_N"]),)](
        x.reshape(n_in), weight, weight if bias is None else bias, y, n_out, n_in, weight.stride(0),
        HAS_BIAS=bias is not None, **shape)
    return y


@torch.library.custom_op("streamkv::one_row_linear", mutates_args=())
def one_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear` as one opaque operator: torch.compile calls it as it is, where a Triton launch in the step
    would be traced and analysed at each of the step's 129 linears (stop 28: the step with the kernel
    launched directly did not finish compiling and running in 145 s, the default's in about 100). Under
    Triton's interpreter (CPU), tracing the launch fails outright; the operator compiles there too."""
    return linear(x, weight, bias)


@one_row_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def one_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """What `linear` takes: a single input row, a row-major weight with unit stride over `in`."""
    return x.numel() == x.shape[-1] and weight.dim() == 2 and weight.stride(1) == 1


class OneRowLinears(TorchFunctionMode):
    """Inside it, F.linear on one row runs `linear`; everything else runs as it would."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if one_row(x, weight):
                return one_row_linear(x, weight, bias)
        return func(*args, **kwargs)
