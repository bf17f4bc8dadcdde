"""One worker of a stage: compute every unit of work it can claim, until each unit is done.

A stage's points to compute become units (one per point; the recompute baseline one per token range when
it is split over several workers, streamkv/shards.py). Every worker gets the whole list and the same
rules, so workers need no coordinator:
- worker k of n first tries its own units (k, k+n, ...), then the others', skipping any that another
  worker holds (Store.claim: a lock that dies with its holder, streamkv/locks.py); it then waits for those held ones and takes any that their holder
  left undone (a killed holder releases its claim at once);
- after claiming, a unit already done (by another worker, another run of the stage, an earlier attempt)
  is skipped, so no unit is computed twice and a re-run computes only what is missing;
- the model stays loaded across units (one Runner per worker);
- results are written by slot through the store (atomic, keyed by config_hash); a baseline range is
  written under results/.parts/<config_hash>/, and whoever writes the last range merges them into the
  baseline's result and removes them.

`Task` is what an executor submits (streamkv/executors.py): a submitit Checkpointable, so a Slurm task
that is preempted or times out is requeued by submitit and, rerun, skips what it had finished.
"""
from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from . import shards
from .console import say
from .runspec import RunSpec
from .store import Store

PARTS = ".parts"


@dataclass(frozen=True)
class Unit:
    slot: str
    spec: RunSpec
    part: tuple[int, int] | None = None            # a baseline token range; None: the whole point
    ranges: tuple[tuple[int, int], ...] = ()       # every range of the point, when it is split

    @property
    def config_hash(self) -> str:
        return self.spec.config_hash()

    @property
    def key(self) -> str:
        return self.config_hash if self.part is None else f"{self.config_hash}.{self.part[0]}-{self.part[1]}"


def units_of(points: list[tuple[str, RunSpec]], split: int) -> list[Unit]:
    """One unit per point; the recompute baseline split into `split` token ranges when split > 1."""
    units = []
    for slot, spec in points:
        if spec.mode == "baseline" and split > 1:
            ranges = tuple(shards.ranges(spec.data.n_tokens, spec.policy.cap_total, split, spec.recompute_batch))
            if len(ranges) > 1:
                units += [Unit(slot, spec, r, ranges) for r in ranges]
                continue
        units.append(Unit(slot, spec))
    return units


def done(store: Store, unit: Unit) -> bool:
    """The unit's point has its current result, or (a range) the range is written."""
    if store.lookup(unit.slot, unit.config_hash, allow_stale=False) is not None:
        return True
    return unit.part is not None and store.tree.is_file(_part_path(store, unit, unit.part))


def _part_path(store: Store, unit: Unit, part: tuple[int, int]) -> Path:
    return store.root / PARTS / unit.config_hash / f"{part[0]}-{part[1]}.pt"


class Worker:
    def __init__(self, store: Store, *, name: str = "worker", cpu_threads: int = 1, device_shared_by: int = 1):
        self.store, self.name, self.cpu_threads = store, name, cpu_threads
        self.device_shared_by = device_shared_by   # workers on this worker's GPU, itself included
        self._runner = None

    @property
    def runner(self):
        if self._runner is None:
            from .runner import Runner  # torch and the engines load only when something must be computed
            # No engine bars: the stage's process shows one bar over all points.
            self._runner = Runner(self.store, progress=False, cpu_threads=self.cpu_threads,
                                  device_shared_by=self.device_shared_by)
        return self._runner

    def work(self, units: list[Unit], index: int = 0, count: int = 1) -> None:
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

    def _settle(self, unit: Unit) -> None:
        """Compute the claimed unit unless it is done; a range then completes its point if it was the last."""
        if not done(self.store, unit):
            began = time.perf_counter()
            if unit.part is None:
                self.runner.run(unit.slot, unit.spec)
            else:
                self._write_part(unit, self.runner.run_part(unit.spec, unit.part))
            what = unit.slot if unit.part is None else f"{unit.slot} tokens {unit.part[0]}..{unit.part[1] - 1}"
            say(f"{self.name}: computed {what} ({time.perf_counter() - began:.1f} s)")
        if unit.part is not None:
            self._merge(unit)

    def _write_part(self, unit: Unit, timed) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save([dataclasses.asdict(r) for r in timed], buffer)
        self.store.tree.write(_part_path(self.store, unit, unit.part), buffer.getvalue())

    def _merge(self, unit: Unit) -> None:
        with self.store.claim(f"{unit.config_hash}.merge", wait=True):
            if self.store.lookup(unit.slot, unit.config_hash, allow_stale=False) is not None:
                return
            paths = [_part_path(self.store, unit, r) for r in unit.ranges]
            if not all(self.store.tree.is_file(p) for p in paths):
                return   # a range is still being computed; its worker merges
            import torch

            from .engines.base import EngineResult

            parts = [(r, [EngineResult(**d) for d in torch.load(io.BytesIO(self.store.tree.read(p)),
                                                                weights_only=True)])
                     for r, p in zip(unit.ranges, paths)]
            self.runner.write_merged(unit.slot, unit.spec, parts)
            self.store.tree.remove_directory(paths[0].parent)
            say(f"{self.name}: merged {len(parts)} ranges into {unit.slot}")


class Task(submitit.helpers.Checkpointable):
    """What an executor submits: worker `index` of `count` over `units`, writing under `results_dir`.
    Checkpointable: on preemption or timeout submitit requeues the same call, which skips done units."""

    def __init__(self, cpu_threads: int = 1, device_shared_by: int = 1):
        self.cpu_threads = cpu_threads   # CPU_THREADS of the stage: explicit, recorded in every fingerprint
        self.device_shared_by = device_shared_by

    def __call__(self, results_dir: str, units: list[Unit], index: int, count: int) -> None:
        Worker(Store(results_dir), name=f"worker {index + 1}/{count}", cpu_threads=self.cpu_threads,
               device_shared_by=self.device_shared_by).work(units, index, count)
