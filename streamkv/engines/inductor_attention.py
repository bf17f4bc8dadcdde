"""Decode attention as plain element-wise products and sums, for torch.compile to generate: the fast engine's
`decode_attention="inductor"`.

Why: inside the compiled step, SDPA is an extern call (cuDNN on an H100: 13.1 µs a layer for a 6.9 µs byte
floor, docs/bench/h100_profile_step_sdpa.json) that Inductor cannot fuse with the rotary and K/V writes
around it. Written as products and sums, the scores, the mask, the softmax and the weighted sum of values
become Inductor reductions it schedules, splits across SMs and tunes itself (gpt-fast's route to its
decode attention, with coordinate-descent tuning on). Whether that is faster is measured, not assumed:
`scripts/bench_decode.py --engines fast,fast:decode_attention=inductor`.

The same function as SDPA, other rounding: scores, softmax and the sum over slots in the work precision
(fp32, or float64 for float64 tensors), the output cast once to the query's dtype. Grouped-query heads are
grouped by their K/V head with a reshape, never by copying K/V per query head.
"""
from __future__ import annotations

import torch


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """q [B, H, 1, D], k/v [B, Hkv, C, D], additive mask [1, C] -> [B, H, 1, D]."""
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, 1, dim).to(work)          # [B, Hkv, G, 1, D]
    scores = (grouped * k[:, :, None].to(work)).sum(-1) * scaling + mask[0].to(work)  # [B, Hkv, G, C]
    weights = scores.softmax(-1)
    out = (weights[..., None] * v[:, :, None].to(work)).sum(-2)                       # [B, Hkv, G, D]
    return out.reshape(batch, heads, 1, dim).to(q.dtype)
