"""What every engine returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EngineResult:
    """One evaluation of a stream of T tokens.

    nll                   CPU tensor [T−1]: NLL of tokens 1..T−1 (the prediction of token t+1 from the
                          logits at t), prefill predictions included. fp32 by default; float64 when the
                          engine was asked for loss_dtype float64 (the equivalence tests compare at 1e-6,
                          finer than an fp32 loss of ~8 resolves).
    cache_len_after_step  cache length after each step's prune, read from the cache tensors themselves
                          (empty for recompute, which keeps no cache).
    ttft_ms               the prefill step (forward, its losses, its prune); None if not measured.
    tpot_ms               mean time of one later step (one token); None without decode steps.
    wall_s                the whole evaluation, host wall clock, device work included.
    peak_memory_mb        {phase: peak MiB} on CUDA (reset between phases), None on CPU.
    engine                the engine's name.
    """

    nll: torch.Tensor
    cache_len_after_step: list[int]
    ttft_ms: float | None
    tpot_ms: float | None
    wall_s: float
    peak_memory_mb: dict | None
    engine: str
