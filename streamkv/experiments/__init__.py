"""The stages, and everything the rest of the code may know about them: this registry is the only list.

A stage is a named set of points (streamkv/context.py `Point`) that one command computes. Its entry says
how it is planned, what switches it into `paper`, which baselines it is compared against, which tables its
rows feed, where its results live and what its command is called: cli.py makes one command per stage,
`paper` runs the enabled ones in this order (streamkv/plans.py), reports.py asks each enabled stage for its
table rows, the store finds results under the stages' slot roots and settings reads each switch from the
environment. Nothing here imports a stage's module: the store and settings read this registry, and the
planning code (which imports the store) loads on first use.

Adding a stage: one module streamkv/experiments/<name>.py with `plan(ctx) -> list[Point]` (plus
`rows(ctx)` when it feeds tables, and `OPTIONS`, click options of its own command, when it has any), and
one line in STAGES.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

# Where slots live below the results directory: under paper_experiments/ (the paper's grid), or at its top.
GRID = "paper_experiments"
TOP = ""
# `streamkv run` without --output: ad-hoc points, no stage's (runs/{dataset}/{hash12}).
AD_HOC = "runs"
BASELINE = "baseline"   # the stage every compared stage needs (streamkv/plans.py)
# The module whose make(store, settings, *, progress, device_shared_by) gives the runner of RunSpecs.
RUNNER = "streamkv.runner"


@dataclass(frozen=True)
class Stage:
    name: str                      # in plans, the stage's summary line and its Make target
    command: str                   # its CLI command (streamkv/cli.py)
    help: str                      # the command's help
    slots: str                     # the first part of its points' slots, e.g. "main" in main/pg19/lazy
    directory: str = GRID          # where its slots live below the results directory (GRID or TOP)
    switch: str | None = None      # the Settings bool that puts it in `paper` (env: its name upper-cased)
    compared_with: str | None = None   # the baselines it is compared against: "all" datasets', "long", or none
    tables: tuple[str, ...] = ()   # the tables its rows feed (stems in streamkv.tables.GENERATORS)
    runner: str = RUNNER           # the module whose make() gives the runner of its points (worker.py)
    here: bool = False             # its points are computed in the stage's own process, whatever executor

    @property
    def module(self):
        return importlib.import_module(f"{__name__}.{self.name}")

    def plan(self, ctx, **options) -> list:
        """The stage's Points; `options` are its command's own (e.g. the baseline's --runs)."""
        return self.module.plan(ctx, **options)

    def rows(self, ctx):
        """What its tables show (row labels and slots, from its plan): streamkv.tables.TablesSpec.rows."""
        return self.module.rows(ctx)

    @property
    def options(self) -> tuple:
        """Click options of its own command, beside the knobs every stage command takes."""
        return getattr(self.module, "OPTIONS", ())

    @property
    def env(self) -> str | None:
        return None if self.switch is None else self.switch.upper()


STAGES: tuple[Stage, ...] = (
    Stage(BASELINE, "baseline", "The fixed sliding-window-recompute baseline, written once and reused.",
          "baselines", TOP),
    Stage("main", "main", "Main results: baseline (reused) + Start+Recent + Lazy Pruning, both datasets.",
          "main", compared_with="all", tables=("tables",)),
    Stage("ablations", "ablations", "Lazy Pruning ablation ladder on the long dataset.", "ablations",
          switch="run_ablations", compared_with="long", tables=("ablations",)),
    Stage("sweeps", "sweeps", "R sweep (σ and δ too with RUN_QUALITY_HEURISTICS=1) on the long dataset.",
          "sweeps", switch="run_sweeps", compared_with="long", tables=("sweeps",)),
    Stage("mit", "mit-reference", "MIT streaming-llm's eval_long_ppl.py with our Start+Recent sizes (+ the "
          "window-matched variant); exit 1 when a run failed.", "mit_bench", TOP, switch="run_mit_reference",
          # MIT's script needs its checkout and interpreter (MIT_REPO, PYTHON_BIN): this machine has them.
          tables=("mit_reference",), runner="streamkv.mit_runner", here=True),
    Stage("bench", "bench", "Decode speed and memory: Start+Recent and Lazy Pruning vs sliding-window "
          "recompute.", "mit_bench", TOP, switch="run_mit_bench", tables=("engines",)),
)


def names() -> tuple[str, ...]:
    return tuple(s.name for s in STAGES)


def get(name: str) -> Stage:
    try:
        return next(s for s in STAGES if s.name == name)
    except StopIteration:
        raise ValueError(f"unknown stage {name!r}; choose one of {names()}") from None


def enabled(settings) -> tuple[Stage, ...]:
    """What `paper` runs and the tables show: every stage whose switch is on, in registry order."""
    return tuple(s for s in STAGES if s.switch is None or getattr(settings, s.switch))


def top_level() -> tuple[str, ...]:
    """Slot roots stored at the top of the results directory rather than under GRID."""
    return tuple(dict.fromkeys([s.slots for s in STAGES if s.directory == TOP] + [AD_HOC]))


def result_directories() -> tuple[str, ...]:
    """The directories right below the results directory that hold results, in registry order."""
    return tuple(dict.fromkeys([s.slots if s.directory == TOP else s.directory for s in STAGES] + [AD_HOC]))
