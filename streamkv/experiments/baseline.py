"""The fixed sliding-window-recompute baseline, per dataset: written once, then reused."""
from __future__ import annotations

import dataclasses

import click

from ..context import Context, Point
from ..plans import BASELINE_DISPLAY
from ..profiles import Dataset
from ..runspec import RunSpec
from ..spec import MeasureSpec
from ..store import Store

OPTIONS = (click.option("--runs", type=click.IntRange(min=1), default=None,
                        help="Timed repeats to average (default: keep the stored baseline, else 1)"),)


def _stored_spec(store: Store, slot: str) -> RunSpec | None:
    try:
        return RunSpec.from_dict(store.read(store.path(slot))["spec"])
    except (ValueError, KeyError, TypeError):
        return None


def plan(ctx: Context, runs: int | None = None, datasets: tuple[Dataset, ...] | None = None) -> list[Point]:
    """The recompute baseline per dataset. Without `runs`, a stored baseline that differs only in its
    repeat count is the one wanted: the baseline is fixed and reused, not re-timed per REPEAT_RUNS."""
    points = []
    for d in datasets or ctx.profile.datasets:
        slot = f"baselines/{d.name}"
        data = ctx.data(d)
        spec = None if data is None else RunSpec(
            model=ctx.model, data=data, mode="baseline", policy=ctx.profile.baseline_policy(), engine="recompute",
            device=ctx.profile.device,
            # No warm-up run: one baseline run recomputes a full window per token for the whole stream
            # (PG19: minutes), and its TPOT is a mean over thousands of steps, the first few included.
            measure=MeasureSpec(0, runs or 1), recompute_batch=ctx.settings.recompute_batch)
        stored = _stored_spec(ctx.store, slot)
        if spec is not None and runs is None and stored is not None \
                and dataclasses.replace(stored, measure=spec.measure) == spec:
            spec = stored
        points.append(Point(slot, spec, BASELINE_DISPLAY))
    return points
