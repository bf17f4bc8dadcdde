"""Rounding bounds the numeric tolerances of the suite are derived from.

A tolerance tuned on one CPU breaks on another: ATen's vectorised kernels reduce in lanes whose width is
the instruction set's (16 fp32 lanes with AVX-512, 8 with AVX2 and with the portable `default` kernels),
so a long reduction rounds differently on each. The same fp32 log-softmax over 50k logits is 7.3e-6 from
float64 on AVX-512 and 1.6e-5 on AVX2; a fixed 1e-5 held on one and failed on the other. Every tolerance
below is therefore a function of what sets it: the dtype's unit roundoff, the number of terms reduced and
the magnitude of the result. CI runs the numerics tests twice, on the machine's kernels and with
ATEN_CPU_CAPABILITY=default (Makefile: test-default-kernels), so two kernel families exercise each bound.

Sums use the probabilistic bound of Higham & Mary (SIAM J. Sci. Comput. 41(5), 2019): summing n terms in
any order with rounding errors that are independent and mean-zero, the relative error (against the sum of
|terms|) stays within λ·√n·u with probability at least 1 − 2·exp(−λ²/2); λ = 5 makes that 1 − 7.5e-6.
The worst case, n·u, needs every rounding to go the same way; for 50k terms it is 3e-3 in fp32, looser than
what half precision gives, so it could not tell an fp32 result from an fp16 one.
"""
from __future__ import annotations

import math

import torch

LAMBDA = 5.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of rounding one real number to `dtype`."""
    return torch.finfo(dtype).eps / 2


def sum_relative(dtype: torch.dtype, n_terms: int) -> float:
    """Relative error of a sum of n terms in `dtype` (probabilistic bound, any summation order)."""
    return LAMBDA * math.sqrt(n_terms) * unit_roundoff(dtype)


def log_softmax(dtype: torch.dtype, n_terms: int, magnitude: float) -> float:
    """Absolute error of one output of log_softmax over n logits in `dtype`, outputs of size ≤ magnitude.

    log_softmax(x)_t = (x_t − max) − log Σ exp(x_i − max). The sum of n exps in (0, 1] carries
    sum_relative(n) and each exp one ulp (2u); log turns that relative error into an absolute one. Three
    roundings remain (x_t − max, the log, the difference), each ≤ u × a value of size ≤ magnitude + ln n.
    """
    u = unit_roundoff(dtype)
    return sum_relative(dtype, n_terms) + 2 * u + 3 * u * (magnitude + math.log(n_terms))


def reduction_lengths(config, n_keys: int) -> int:
    """The terms reduced on one path from embedding to loss of a decoder: per layer the hidden size (QKV,
    output and up projections), the MLP width (down projection) and the keys attended to; then the
    vocabulary (LM head and log-softmax)."""
    per_layer = config.hidden_size + config.intermediate_size + n_keys
    return config.num_hidden_layers * per_layer + config.vocab_size


def forward_nll(dtype: torch.dtype, config, n_keys: int, magnitude: float) -> float:
    """Absolute error of a per-token NLL of size ≤ magnitude, computed by a forward in `dtype` (against
    the same forward in exact arithmetic).

    Each reduction of n terms contributes sum_relative(n) to the relative error of what it feeds; along
    one path the contributions add, and independent ones add in quadrature: λ·u·√(Σ n). The NLL carries
    that relative error. This takes the network's condition to be O(1) per layer: true of these tiny
    2-4 layer models with normalised activations, and the margin below each assert says by how much.
    """
    return LAMBDA * math.sqrt(reduction_lengths(config, n_keys)) * unit_roundoff(dtype) * magnitude


def rounded_intermediates(dtype: torch.dtype, n_roundings: int, magnitude: float) -> float:
    """Absolute difference between two evaluations of a value of size ≤ magnitude that round the same
    n intermediates to `dtype` at different places (fused vs unfused kernels): each one rounding, u."""
    return n_roundings * unit_roundoff(dtype) * magnitude


# Float64 engine comparisons: the per-token NLL of two engines that realise the same schedule, both in
# float64, differ by float64 rounding only, forward_nll(float64, ...) ≈ 2e-13 for the tiny models at |NLL|
# ≤ 13 (observed ≤ 1.1e-14 with AVX-512, AVX2 and default kernels). EXACT sits 10^6 above that, so no
# kernel's rounding reaches it, and 10^3 below BROKEN, the least a wrong key angle, a wrong slot or a wrong
# sink distance moves the NLL (the mutation tests assert it).
EXACT = 1e-6
BROKEN = 1e-3
