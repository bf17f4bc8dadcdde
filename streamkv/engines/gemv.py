"""One-row linears as a Triton GEMV: the fast engine's `linear="triton"`.

Why: a decode step multiplies one row by every weight matrix, and cuBLAS's kernels for that shape ran at
1.21-1.95x their byte floor on an H100, where this kernel ran at 1.14-1.56x (scripts/probe_gemv.py,
docs/bench/h100_probe_gemv.json: Pythia-2.8B's four shapes, 32 layers' weights in one CUDA graph; about
250 µs a step less over the model's 128 linears). The whole captured step gained 241 µs on an H100
(docs/bench/h100_bench_gemv_stop29.json), so it is the fast engine's default on CUDA (fast.default_linear).

How the model reaches it without patching it: engines/gemv_fusion.py, a TorchFunctionMode that sends each
one-row F.linear here, with what it may fold into the kernel: the layer norm before it (NORM: every program
computes the row's mean and variance itself), the activation after it (ACTIVATION), the residual rows added
to its output (RESIDUALS). Each is the same function as the unfused calls, with fewer fp16 roundings.

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

from .triton_support import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gemv(x_ptr, w_ptr, b_ptr, y_ptr, g_ptr, beta_ptr, r1_ptr, r2_ptr, n_out, n_in, stride_w, eps,
              HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, NORM: tl.constexpr, RESIDUALS: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # The work dtype follows the output's, so callers pass only ints, bools and eps.
        work = tl.float64 if y_ptr.dtype.element_ty == tl.float64 else tl.float32
        if NORM:
            # The layer norm's statistics of x as F.layer_norm takes them: the mean, then the biased variance
            # about it. Every program computes them (a row is a few KB, read from cache), in BLOCK_K chunks
            # like the product's, so the kernel needs no more registers than without the norm: a whole-row
            # block would lower its occupancy, and with it the bytes in flight a GEMV lives on.
            total = tl.zeros((BLOCK_K,), dtype=work)
            for start in range(0, n_in, BLOCK_K):
                cols = start + tl.arange(0, BLOCK_K)
                total += tl.load(x_ptr + cols, mask=cols < n_in, other=0.0).to(work)
            mean = tl.sum(total, axis=0) / n_in
            spread = tl.zeros((BLOCK_K,), dtype=work)
            for start in range(0, n_in, BLOCK_K):
                cols = start + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + cols, mask=cols < n_in, other=0.0).to(work)
                centred = tl.where(cols < n_in, x - mean, 0.0)
                spread += centred * centred
            rstd = 1.0 / tl.sqrt(tl.sum(spread, axis=0) / n_in + eps)
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
        if RESIDUALS >= 1:   # rows added to the output, in the order the model adds them
            y += tl.load(r1_ptr + rows, mask=rows < n_out, other=0.0).to(work)
        if RESIDUALS == 2:
            y += tl.load(r2_ptr + rows, mask=rows < n_out, other=0.0).to(work)
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
MAX_RESIDUALS = 2             # GPT-NeoX's parallel residual: mlp_output + attn_output + hidden_states


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, shape: dict | None = None,
           activation: int = NO_ACTIVATION, norm: Norm | None = None, residuals=()) -> torch.Tensor:
    """F.linear(norm(x), weight, bias) for x [..., in] holding one row, `norm` a layer norm over `in` or
    none, then the ACTIVATIONS entry `activation`, then plus each of `residuals` (at most MAX_RESIDUALS
    tensors of the output's shape); `shape` overrides tile() (the probe's grid)."""
    n_out, n_in = weight.shape
    if len(residuals) > MAX_RESIDUALS:
        raise ValueError(f"the kernel adds at most {MAX_RESIDUALS} residuals, not {len(residuals)}")
    y = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
    shape = shape or tile(n_out, n_in)
    gain, shift, eps = norm if norm is not None else (weight, weight, 0.0)   # unread without NORM
    r1, r2 = (*(r.reshape(n_out) for r in residuals), y, y)[:2]               # unread past RESIDUALS
    _gemv[(triton.cdiv(n_out, shape["BLOCK_N"]),)](
        x.reshape(n_in), weight, weight if bias is None else bias, y, gain, shift, r1, r2, n_out, n_in,
        weight.stride(0), eps, HAS_BIAS=bias is not None, ACTIVATION=activation, NORM=norm is not None,
        RESIDUALS=len(residuals), **shape)
    return y


@torch.library.custom_op("streamkv::one_row_linear", mutates_args=())
def one_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: int,
                   norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None, eps: float,
                   residuals: list[torch.Tensor]) -> torch.Tensor:
    """`linear` as one opaque operator: torch.compile calls it as it is, where a Triton launch in the step
    would be traced and analysed at each of the step's 129 linears (stop 28: the step with the kernel
    launched directly did not finish compiling and running in 145 s, the default's in about 100). Under
    Triton's interpreter (CPU), tracing the launch fails outright; the operator compiles there too.
    norm_weight given: x is a layer norm's input, and (norm_weight, norm_bias, eps) that norm."""
    norm = None if norm_weight is None else Norm(norm_weight, norm_bias, eps)
    return linear(x, weight, bias, activation=activation, norm=norm, residuals=residuals)


@one_row_linear.register_fake
def _(x, weight, bias, activation, norm_weight, norm_bias, eps, residuals):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
