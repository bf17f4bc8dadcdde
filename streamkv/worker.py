"""One worker of a stage: settle every unit of work it can claim, until each unit is settled.

This is the one place where a point is claimed, found done, copied from an equal result or computed,
whichever executor runs the worker (streamkv/executors.py: the stage's own process, worker processes on
this host, a Slurm array). A stage's points to compute become units (`units_of`): one per distinct spec,
whose other slots are filled by copying its result (`Unit.copies`: the R = 64 sweep point is the main lazy
point), and the recompute baseline one per token range when it is split over several workers
(streamkv/shards.py). Every worker gets the whole list and the same rules, so workers need no coordinator:
- worker k of n first tries its own units (k, k+n, ...), then the others', skipping any that another
  worker holds (Store.claim: a lock that dies with its holder, streamkv/locks.py); it then waits for those
  held ones and takes any that their holder left undone (a killed holder releases its claim at once);
- after claiming, a unit whose slot was written since the stage planned it (by another worker, another run
  of the stage) is done: never computed twice; a re-run computes only what is missing;
- a unit that may be copied takes a result with the same config_hash from another slot, else it is
  computed by its stage's runner (streamkv/experiments: Stage.runner), made on first need (torch and the
  engines load only when a RunSpec must be computed) and once per worker: the model stays loaded;
- results are written by slot through the store (atomic, keyed by config_hash); a baseline range is
  written under results/.parts/<config_hash>/, and whoever writes the last range merges them into the
  baseline's result and removes them.
`Worker.work` returns what happened to each slot it settled (SETTLED), which the stage reports.

`Task` is what an executor submits: a submitit Checkpointable, so a Slurm task that is preempted or times
out is requeued by submitit and, rerun, skips what it had finished.
"""
from __future__ import annotations

import dataclasses
import importlib
import io
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from . import experiments
from .console import say
from .mit_runner import MitFailure
from .settings import Settings
from .store import Store

PARTS = ".parts"
# What a worker did with a slot: computed, copied from an equal result, failed (MIT's script ended without
# a result), or found done (written since the stage planned it, by another worker or run).
COMPUTED, COPIED, FAILED, DONE = "computed", "copied", "failed", "done"


@dataclass(frozen=True)
class Unit:
    slot: str
    spec: object                                   # a RunSpec or mit.MitSpec (context.Spec)
    runner: str = experiments.RUNNER               # its stage's runner module (Stage.runner)
    part: tuple[int, int] | None = None            # a baseline token range; None: the whole point
    ranges: tuple[tuple[int, int], ...] = ()       # every range of the point, when it is split
    may_copy: bool = True                          # False: a re-measurement (FORCE, STRICT_BASELINE_CHECK)
    planned: tuple | None = None                   # the slot's file as the stage found it (Store.identity)
    copies: tuple[tuple[str, tuple | None], ...] = ()   # (slot, planned) of other slots with this spec

    @property
    def config_hash(self) -> str:
        return self.spec.config_hash()

    @property
    def key(self) -> str:
        return self.config_hash if self.part is None else f"{self.config_hash}.{self.part[0]}-{self.part[1]}"

    @property
    def slots(self) -> tuple[str, ...]:
        return (self.slot,) + tuple(slot for slot, _ in self.copies)


def units_of(points: list[Unit], split: int) -> list[Unit]:
    """One unit per distinct spec, the later slots of an equal spec its copies; the recompute baseline split
    into `split` token ranges when split > 1."""
    first: dict[str, Unit] = {}
    for p in points:
        h = p.config_hash
        first[h] = dataclasses.replace(first[h], copies=first[h].copies + ((p.slot, p.planned),)) if h in first else p
    units = []
    for unit in first.values():
        if unit.runner == experiments.RUNNER and unit.spec.mode == "baseline" and split > 1:
            from . import shards   # it imports torch: only when a baseline is split over workers

            ranges = tuple(shards.ranges(unit.spec.data.n_tokens, unit.spec.policy.cap_total, split,
                                        unit.spec.recompute_batch))
            if len(ranges) > 1:
                units += [dataclasses.replace(unit, part=r, ranges=ranges) for r in ranges]
                continue
        units.append(unit)
    return units


def written(store: Store, slot: str, config_hash: str, planned: tuple | None) -> bool:
    """Whether the slot holds a result of this hash that was not there when the stage planned it. File
    identity, not clocks: nodes sharing a results directory need not agree on the time."""
    if store.identity(slot, config_hash) == planned:
        return False
    try:
        return store.read(store.path(slot))["config_hash"] == config_hash
    except ValueError:
        return False


def settled(store: Store, unit: Unit) -> bool:
    """Every slot of the unit's point holds the result this stage is after."""
    return all(written(store, slot, unit.config_hash, planned)
               for slot, planned in ((unit.slot, unit.planned), *unit.copies))


def _part_path(store: Store, unit: Unit, part: tuple[int, int]) -> Path:
    return store.root / PARTS / unit.config_hash / f"{part[0]}-{part[1]}.pt"


class Worker:
    """Settles units (module doc). `bar`: the stage's progress bar when the worker runs in the stage's own
    process (engine bars shown, no log lines); otherwise it says a line per unit, which the stage echoes.
    `runner` (tests) replaces the runner of RunSpecs."""

    def __init__(self, store: Store, settings: Settings, *, name: str = "worker", bar=None,
                 device_shared_by: int = 1, runner=None):
        self.store, self.settings, self.name, self.bar = store, settings, name, bar
        self.device_shared_by = device_shared_by   # workers on this worker's GPU, itself included
        self._runners = {} if runner is None else {experiments.RUNNER: runner}
        self.report: dict[str, str] = {}

    def runner(self, module: str):
        if module not in self._runners:
            make = importlib.import_module(module).make
            self._runners[module] = make(self.store, self.settings, progress=self.bar is not None,
                                         device_shared_by=self.device_shared_by)
        return self._runners[module]

    def work(self, units: list[Unit], index: int = 0, count: int = 1) -> dict[str, str]:
        order = units[index::count] + [u for i, u in enumerate(units) if i % count != index]
        held = []
        for unit in order:
            with self.store.claim(unit.key, wait=False) as mine:
                if mine:
                    self._settle(unit)
                else:
                    held.append(unit)
        for unit in held:
            with self.store.claim(unit.key, wait=True):
                self._settle(unit)
        return self.report

    def _settle(self, unit: Unit) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(unit.slot)
        if not (self._settle_point(unit) if unit.part is None else self._settle_part(unit)):
            return   # a range: its point is complete only once the last range is merged
        for slot, planned in unit.copies:
            if self.report.get(unit.slot) == FAILED:   # nothing to copy: each slot tries on its own, as alone
                self._settle_point(dataclasses.replace(unit, slot=slot, planned=planned, copies=()))
            elif written(self.store, slot, unit.config_hash, planned):
                self.report.setdefault(slot, DONE)
            else:
                self.store.copy(self.store.path(unit.slot), slot)
                self.report[slot] = COPIED
        if self.bar is not None:
            self.bar.update(len(unit.slots))

    def _settle_point(self, unit: Unit) -> bool:
        """Find the claimed point done, copy it or compute it; True: the point is settled."""
        if written(self.store, unit.slot, unit.config_hash, unit.planned):
            self.report.setdefault(unit.slot, DONE)
            return True
        source = self._equal_result(unit) if unit.may_copy else None
        if source is not None:
            self.store.copy(source, unit.slot)
            self.report[unit.slot] = COPIED
            return True
        began = time.perf_counter()
        try:
            self.runner(unit.runner).run(unit.slot, unit.spec)
        except MitFailure as failure:   # a reference that cannot run: the stage goes on
            say(str(failure))
            self.report[unit.slot] = FAILED
            return True
        self.report[unit.slot] = COMPUTED
        self._said("computed", unit.slot, began)
        return True

    def _equal_result(self, unit: Unit) -> Path | None:
        """A result with the unit's config_hash in another slot (another run may have just written it)."""
        return next((e.path for e in self.store.scan().entries
                     if e.config_hash == unit.config_hash and e.slot != unit.slot), None)

    def _settle_part(self, unit: Unit) -> bool:
        """Compute the claimed range unless it is there, and merge the point when it was the last; True:
        the point is settled (found done, or merged here)."""
        if written(self.store, unit.slot, unit.config_hash, unit.planned):
            self.report.setdefault(unit.slot, DONE)
            return True
        if not self.store.tree.is_file(_part_path(self.store, unit, unit.part)):
            began = time.perf_counter()
            self._write_part(unit, self.runner(unit.runner).run_part(unit.spec, unit.part))
            self._said("computed", f"{unit.slot} tokens {unit.part[0]}..{unit.part[1] - 1}", began)
        if not self._merge(unit):
            return False
        self.report[unit.slot] = COMPUTED
        return True

    def _said(self, what: str, where: str, began: float) -> None:
        if self.bar is None:   # the stage's process shows its own bar instead
            say(f"{self.name}: {what} {where} ({time.perf_counter() - began:.1f} s)")

    def _write_part(self, unit: Unit, timed) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save([dataclasses.asdict(r) for r in timed], buffer)
        self.store.tree.write(_part_path(self.store, unit, unit.part), buffer.getvalue())

    def _merge(self, unit: Unit) -> bool:
        with self.store.claim(f"{unit.config_hash}.merge", wait=True):
            if written(self.store, unit.slot, unit.config_hash, unit.planned):
                return False
            paths = [_part_path(self.store, unit, r) for r in unit.ranges]
            if not all(self.store.tree.is_file(p) for p in paths):
                return False   # a range is still being computed; its worker merges
            import torch

            from .engines.base import EngineResult

            parts = [(r, [EngineResult(**d) for d in torch.load(io.BytesIO(self.store.tree.read(p)),
                                                                weights_only=True)])
                     for r, p in zip(unit.ranges, paths)]
            self.runner(unit.runner).write_merged(unit.slot, unit.spec, parts)
            self.store.tree.remove_directory(paths[0].parent)
            say(f"{self.name}: merged {len(parts)} ranges into {unit.slot}")
            return True


class Task(submitit.helpers.Checkpointable):
    """What an executor submits: worker `index` of `count` over `units`, writing under `results_dir`; returns
    its report (Worker.work). Checkpointable: on preemption or timeout submitit requeues the same call,
    which skips done units."""

    def __init__(self, settings: Settings, device_shared_by: int = 1):
        self.settings = settings   # CPU_THREADS among them: explicit, recorded in every fingerprint
        self.device_shared_by = device_shared_by

    def __call__(self, results_dir: str, units: list[Unit], index: int, count: int) -> dict[str, str]:
        return Worker(Store(results_dir), self.settings, name=f"worker {index + 1}/{count}",
                      device_shared_by=self.device_shared_by).work(units, index, count)
