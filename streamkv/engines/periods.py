"""The decode engine's numbers in one forward per prune period: perplexity only, for points no faster
engine realises (score policies, the composed-fp16 ablation, refresh tokens).

Between two prunes the cache only grows: each token of the period sees the cache as the last prune left
it, the period's earlier tokens and itself, at the positions the decode engine gives them. Fed in one
forward with a causal mask (query i is key L − q + i, as HF's cache and engines.attention.PROBABILITIES
align it), the period's tokens see exactly that, so one forward per period computes the same function as
one per token; only the grouping of floating-point sums changes (float64: within 1e-12 of the reference,
tests/test_periods.py). Lazy Pruning at R = 64 prunes once every 64 tokens, so PG19's 20k tokens take
about 300 forwards where decoding takes 20 000: 7 to 9 s against about 6 minutes on an H100 (stop 27,
docs/bench/README.md).

A score policy sees the same attention rows: a period's forward hands over its q queries at once, and a
score may not depend on how queries are grouped into calls (policies/scored.py). Strict pruning (R = 1)
prunes after every token, so its periods are single tokens and this engine is the decode engine.

No timing: a period's forward is not a decoded token, so the runner times such points with the decode
engine on the profile's timing prefix (engines.timing_engine, plans.with_engines).
"""
from __future__ import annotations

import dataclasses

from . import decode
from .base import EngineResult


def by_period(schedule):
    """`schedule` (a Schedule or ScoredSchedule) with each run of steps up to and including a prune, or up
    to the end, merged into one step that feeds all of their tokens and then prunes as the last did."""
    merged, first = [], None
    for step in schedule.steps:
        if first is None:
            first = step
        if step.prunes or step is schedule.steps[-1]:
            merged.append(dataclasses.replace(step, index=len(merged), fed_start=first.fed_start,
                                              **_cache_before(first)))
            first = None
    return dataclasses.replace(schedule, steps=tuple(merged))


def _cache_before(step) -> dict:
    """The field that holds the cache before the step: a CacheView (Step) or a length (ScoredStep)."""
    name = "before" if hasattr(step, "before") else "length_before"
    return {name: getattr(step, name)}


def per_step_lengths(schedule, periods, measured: list[int]) -> list[int]:
    """The cache length after each of `schedule`'s steps, from the lengths `measured` after each period:
    inside a period nothing is pruned, so after a step the cache holds what the previous period left plus
    the tokens fed since; the period's last step ends at the measured length."""
    lengths, steps = [], iter(schedule.steps)
    left = 0
    for period, after in zip(periods.steps, measured):
        for step in steps:
            if step.fed_end == period.fed_end:
                lengths.append(after)
                break
            lengths.append(left + step.fed_end - period.fed_start)
        left = after
    return lengths


def evaluate(model, ids, schedule, *, position_mode: str = "cache", rerotation: str = "exact",
             loss_dtype="float32", progress: bool = False) -> EngineResult:
    """Per-token NLL of `schedule` on `ids` [T] as decode.evaluate computes it, one forward per period."""
    periods = by_period(schedule)
    result = decode.evaluate(model, ids, periods, position_mode=position_mode, rerotation=rerotation,
                             loss_dtype=loss_dtype, progress=progress, label="periods")
    return dataclasses.replace(result, engine="periods", ttft_ms=None, tpot_ms=None,
                               cache_len_after_step=per_step_lengths(schedule, periods,
                                                                     result.cache_len_after_step))
