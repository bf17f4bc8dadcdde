"""MIT streaming-llm's own perplexity script with our Start+Recent sizes (streamkv/mit.py plans the
MitSpecs, streamkv/mit_runner.py runs them), beside our main points (appendix table mit_reference.tex)."""
from __future__ import annotations

import click

from .. import tables
from ..context import Context, Point, variant_slot
from ..plans import lines
from . import main

OPTIONS = (
    click.option("--mit-repo", default=None, help="Checkout of mit-han-lab/streaming-llm  [env MIT_REPO]"),
    click.option("--python-bin", default=None,
                 help="Interpreter that runs MIT's script  [env PYTHON_BIN, default this one; `make mit` uses "
                      ".venv-mit]"),
)


def plan(ctx: Context) -> list[Point]:
    return [Point(m.slot, m.spec, m.reference.display) for m in ctx.mit()]


def rows(ctx: Context) -> tuple[tables.Comparison, ...]:
    """Each MIT reference beside the main point of ours with the same sinks and recent window."""
    ours = {line.slot: line for line in lines(main.plan(ctx))}
    return tuple(tables.Comparison(m.dataset.display, tables.Line(m.reference.display, m.slot),
                                   ours[variant_slot("main", m.dataset, m.reference.ours)], m.spec.provenance)
                 for m in ctx.mit())
