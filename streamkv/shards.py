"""The recompute baseline split over workers: token ranges out, one EngineResult back.

Its windows are independent forwards (streamkv/engines/recompute.py), so predicted tokens 0..T−2 split
into contiguous ranges, one per worker: the first range holds the whole prefill (one forward over C
tokens) plus its share of windows, every other range only windows. Merging concatenates the per-token
NLL in range order, so the merged result is the unsharded one bit for bit (each window is the same
forward), and its config_hash is the point's own: sharding is how a point is computed, not what it is.

Timing of a merged result: TTFT is the first range's prefill, TPOT the mean over every range's windows
(each range's decode time weighted by its window count), wall_s the sum of the ranges' wall times (the
device time one worker would have spent), peak memory the largest per phase.
"""
from __future__ import annotations

import torch

from .engines.base import EngineResult


def ranges(n_tokens: int, cap: int, parts: int, batch: int = 1) -> list[tuple[int, int]]:
    """Up to `parts` contiguous (start, stop) ranges of predicted tokens covering 0..n_tokens−2, cut at
    multiples of `batch` windows (the recompute engine's batches, aligned to the whole run's windows: a cut
    inside a batch would make both neighbouring parts forward that batch)."""
    if parts < 1 or n_tokens < 2 or batch < 1:
        raise ValueError(f"need parts >= 1, n_tokens >= 2 and batch >= 1, got {parts}, {n_tokens}, {batch}")
    prefill = min(cap, n_tokens - 1)
    windows = n_tokens - 1 - prefill
    # A range without a window would be empty (or the prefill alone).
    parts = max(1, min(parts, -(-windows // batch)))
    # The prefill forward costs about one window (one C-token forward): range 0 gets one window fewer;
    # each cut then moves to the nearest batch boundary (two cuts may meet: fewer ranges).
    rows = [max(0, (windows + 1) * k // parts - 1) for k in range(parts + 1)]
    rows = [min(windows, (row + batch // 2) // batch * batch) for row in rows]
    bounds = [0] + list(dict.fromkeys(prefill + row for row in rows[1:-1] if row < windows)) + [n_tokens - 1]
    return list(zip(bounds, bounds[1:]))


def merge(parts: list[tuple[tuple[int, int], EngineResult]], prefill: int) -> EngineResult:
    """One EngineResult from (range, result) pairs that tile 0..T−2 in order (see the module doc)."""
    expected = 0
    for (start, stop), result in parts:
        if start != expected or result.nll.numel() != stop - start:
            raise ValueError(f"range ({start}, {stop}) with {result.nll.numel()} NLLs does not continue at {expected}")
        expected = stop
    windows = [(stop - max(start, prefill), r) for (start, stop), r in parts]
    timed = [(n, r.tpot_ms) for n, r in windows if n]
    decoded = sum(n for n, _ in timed)
    tpot = None if not timed or any(t is None for _, t in timed) else sum(n * t for n, t in timed) / decoded
    peaks = [r.peak_memory_mb for _, r in parts if r.peak_memory_mb]
    peak = {phase: max(p.get(phase, 0.0) for p in peaks) for p in peaks for phase in p} if peaks else None
    first = parts[0][1]
    return EngineResult(nll=torch.cat([r.nll for _, r in parts]), cache_len_after_step=[], ttft_ms=first.ttft_ms,
                        tpot_ms=tpot, wall_s=sum(r.wall_s for _, r in parts), peak_memory_mb=peak,
                        engine=first.engine)
