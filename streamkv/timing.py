"""The timing protocol behind every TTFT/TPOT number (stages, `bench`, scripts/bench_decode.py).

1. Untimed warm-up: WARMUP_RUNS full runs over exactly the shapes the timed runs see (every cache length
   of the stream, the CUDA graph capture of the fast engine), so kernel selection, plan building and
   allocator growth never land in a timed run. On CUDA at least one warm-up run is always made.
2. Repeats: REPEAT_RUNS timed runs; each run times itself with CUDA events (perf_counter on CPU), and
   no decode loop syncs the host per token.
3. Interleaving: the methods of one comparison (strict and lazy, with and without eviction) run in
   turn within every repeat, in one process, so drift of clocks, temperature or host load hits all of
   them alike instead of favouring whichever ran first.
4. Summary: the median over the repeats, and the spread as half the range (max − min) / 2: printed as
   "median ± spread", every repeat lies within median ± 2·spread. Medians, not means: one run disturbed
   by the host is one outlier, not a shifted mean.

On a shared 2-core CPU the spread of a tiny model's TPOT is of the order of the differences between
methods, so the demo profile's timings are printed as indicative (profiles.Profile.timing_indicative).
"""
from __future__ import annotations

import statistics
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")


def interleaved(jobs: dict[str, Callable[[], T]], *, warmup: int, repeats: int,
                progress: Callable[[str, int], None] | None = None) -> dict[str, list[T]]:
    """Run every job `warmup` times untimed, then `repeats` times in turn; {label: timed results}."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        for job in jobs.values():
            job()
    runs: dict[str, list[T]] = {label: [] for label in jobs}
    for k in range(repeats):
        for label, job in jobs.items():
            runs[label].append(job())
            if progress:
                progress(label, k)
    return runs


def median(values: Iterable[float | None]) -> float | None:
    values = list(values)
    return None if not values or any(v is None for v in values) else statistics.median(values)


def spread(values: Iterable[float | None]) -> float | None:
    """Half the range of the repeats (0 for a single run); None when a value is missing."""
    values = list(values)
    return None if median(values) is None else (max(values) - min(values)) / 2


def summary(values: Iterable[float | None]) -> dict:
    values = list(values)
    return {"median": median(values), "spread": spread(values), "runs": values}
