"""What each query sees under a contiguous schedule (sinks + one recent run), as per-token tensors.

Shared by the engines that do not replay the schedule step by step but read it as a table: `parallel`
(masks per chunk) and `fast` (device-side counters inside a captured decode step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..policies.schedule import Schedule
from ..spec import POSITION_MODES


class Unsupported(NotImplementedError):
    """This engine cannot realise this run (refresh tokens, or the composed_fp16 ablation)."""


def cache_slot(n_sink: torch.Tensor, start: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Cache-mode position of token t fed into sinks [0, n_sink) + recent run [start, t): its slot."""
    return n_sink + (t - start)


@dataclass(frozen=True)
class StreamPlan:
    """For every fed token x in [0, T−1): it sees keys [0, n_sink[x]) ∪ [start[x], x] and is fed at
    position[x]; offset[x] = x − position[x]. All int64 CPU tensors [T−1]."""

    n_sink: torch.Tensor
    start: torch.Tensor
    position: torch.Tensor
    offset: torch.Tensor
    max_sinks: int         # sink tokens that must stay cached for the whole stream


def stream_plan(schedule: Schedule, position_mode: str, engine: str) -> StreamPlan:
    if not schedule.contiguous:
        raise Unsupported(
            f"the {engine} engine needs a contiguous schedule (sinks + one recent run); refresh tokens "
            "(refresh_budget > 0) make it non-contiguous: use the decode engine")
    if position_mode not in POSITION_MODES:
        raise ValueError(f"unknown position_mode {position_mode!r}; choose one of {POSITION_MODES}")
    n_fed = schedule.n_tokens - 1
    n_sink = torch.zeros(n_fed, dtype=torch.long)
    start = torch.zeros(n_fed, dtype=torch.long)   # prefill tokens: no sinks, the run starts at 0
    for step in schedule.steps[1:]:
        t = step.fed_start
        assert step.before.end == t, "a decode step feeds the token right after its cache"
        # Sinks only exist after a prune, which always evicts the token right after them; so a key below
        # n_sink is never also in the recent run, and each visible key has exactly one form.
        assert step.before.n_sink == 0 or step.before.start > step.before.n_sink
        n_sink[t], start[t] = step.before.n_sink, step.before.start
    index = torch.arange(n_fed)
    position = cache_slot(n_sink, start, index) if position_mode == "cache" else index
    return StreamPlan(n_sink=n_sink, start=start, position=position, offset=index - position,
                      max_sinks=int(n_sink.max()))
