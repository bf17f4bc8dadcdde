"""Where a stage's units of work run: this process, worker processes on this host, or a Slurm array job.

Every executor runs streamkv/worker.py's Worker over the units (claims, done checks, copies of equal
results, computation, results by slot and config_hash) and returns its report (what happened to each slot):
- `InProcess` (one worker, no --gpus; and always for a stage that runs here, `Stage.here`: MIT's
  reference): one Worker in the stage's own process, the model loaded once, engine progress bars shown;
- `Workers`, `local` with --workers N and/or --gpus all|0,1,3: N worker processes started by submitit's
  LocalExecutor, worker k pinned to GPU gpus[k % len(gpus)] through CUDA_VISIBLE_DEVICES (without --gpus
  the workers run on the CPU: CUDA is hidden from them);
- `Workers`, `slurm`: one array job per stage through submitit's SlurmExecutor (partition, time, GPUs per
  task and account from the flags or STREAMKV_SLURM_*), --workers tasks (default: one per unit).

Every submitted worker gets every unit, so workers never collide, and this process only watches: it shows
one progress bar over all points (counting results as they land in the shared results/ directory), echoes
the workers' lines from their submitit logs, and when the workers are gone submits the points still missing
again, at most `retries` times (a worker that was killed, failed or preempted; submitit itself requeues a
Slurm task that is preempted or times out). The queue is watched with squeue, not sacct: a small cluster
often has no accounting database. A Slurm partition without a responding node fails the stage in one line
once `NODE_GRACE_S` has passed, keeping what was finished; a re-run computes the rest.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import submitit
from tqdm import tqdm

from .context import StageError
from .confined import shown
from .console import say
from .settings import Settings, SettingsError
from .store import Store
from .worker import DONE, Task, Unit, Worker, settled, written

EXECUTORS = ("local", "slurm")
SUBMITIT = ".submitit"
POLL_S = 1.0
NODE_GRACE_S = 30.0        # how long a partition may have no responding node before the stage gives up
_NOT_RESPONDING = ("down", "drain", "drng", "fail", "unk", "maint", "futr", "npc", "powered_down")


@dataclass(frozen=True)
class Options:
    executor: str = "local"
    workers: int | None = None           # None: one per GPU (local), one per unit (slurm)
    gpus: tuple[int, ...] | None = None  # local: CUDA devices, one worker pinned to each in turn
    retries: int = 1
    partition: str | None = None
    time_min: int = 240
    gpus_per_task: int = 0
    account: str | None = None
    python: str | None = None            # slurm: how tasks start Python, e.g. through apptainer
    settings: Settings = Settings()      # what every worker runs with (CPU_THREADS among them)

    @property
    def in_process(self) -> bool:
        return self.executor == "local" and self.gpus is None and (self.workers or 1) == 1


def parse_gpus(raw: str | None) -> tuple[int, ...] | None:
    """--gpus / STREAMKV_GPUS: `all` (every device torch sees), `0,1,3`, or unset/`none` (no pinning)."""
    if raw is None or raw.strip().lower() in ("", "none"):
        return None
    import torch

    count = torch.cuda.device_count()
    if raw.strip().lower() == "all":
        if count == 0:
            raise SettingsError("--gpus all: torch sees no CUDA device")
        return tuple(range(count))
    try:
        gpus = tuple(int(g) for g in raw.split(","))
    except ValueError:
        raise SettingsError(f"--gpus / STREAMKV_GPUS must be all, none or a list like 0,1,3, got {shown(raw)}") \
            from None
    if min(gpus) < 0 or len(set(gpus)) != len(gpus):
        raise SettingsError(f"--gpus / STREAMKV_GPUS must list distinct device numbers >= 0, got {shown(raw)}")
    if max(gpus) >= count:   # else the workers would run on the CPU, pinned to a device that is not there
        raise SettingsError(f"--gpus {shown(raw)}: torch sees "
                            + (f"{count} CUDA devices (0..{count - 1})" if count else "no CUDA device"))
    return gpus


def options(settings: Settings) -> Options:
    if settings.executor not in EXECUTORS:
        raise SettingsError(f"--executor / STREAMKV_EXECUTOR must be one of {', '.join(EXECUTORS)}, "
                            f"got {settings.executor!r}")
    gpus = parse_gpus(settings.gpus)
    if settings.executor == "slurm" and gpus is not None:
        raise SettingsError("--gpus pins local workers; on Slurm ask for GPUs with --slurm-gpus-per-task")
    cpus = os.cpu_count() or 1
    if settings.executor == "local" and (settings.workers or 1) > cpus:
        # Each local worker is a process with its own model: more of them than CPUs only thrash the host.
        raise SettingsError(f"--workers / STREAMKV_WORKERS {settings.workers}: more local worker processes than "
                            f"this machine's {cpus} CPUs; use at most {cpus}, or --executor slurm")
    return Options(settings.executor, settings.workers, gpus, settings.retries, settings.slurm_partition,
                   settings.slurm_time, settings.slurm_gpus_per_task, settings.slurm_account, settings.slurm_python,
                   settings)


def worker_count(opts: Options, n_units: int) -> int:
    if opts.workers is not None:
        return opts.workers
    return len(opts.gpus) if opts.executor == "local" and opts.gpus else (n_units if opts.executor == "slurm" else 1)


class InProcess:
    """One Worker in the stage's own process. `runner` (tests) replaces the runner of RunSpecs."""

    def __init__(self, settings: Settings, runner=None):
        self.settings, self.runner = settings, runner

    def split(self, n_units: int) -> int:
        """Token ranges of a recompute baseline: none, one worker computes it whole."""
        return 1

    def run(self, store: Store, units: list[Unit], bar: tqdm) -> dict[str, str]:
        return Worker(store, self.settings, bar=bar, runner=self.runner).work(units)


class Workers:
    """Submitted workers (module doc): local processes or a Slurm array."""

    def __init__(self, opts: Options):
        self.opts = opts

    def split(self, n_units: int) -> int:
        """Token ranges of a recompute baseline: one per worker."""
        return worker_count(self.opts, n_units)

    def run(self, store: Store, units: list[Unit], bar: tqdm) -> dict[str, str]:
        return run(store, units, self.opts, bar)


def executor(settings: Settings, *, runner=None) -> InProcess | Workers:
    """The executor the settings ask for (--executor, --workers, --gpus); `runner`: in process, with it."""
    if runner is not None:
        return InProcess(settings, runner)
    opts = options(settings)
    return InProcess(settings) if opts.in_process else Workers(opts)


def run(store: Store, units: list[Unit], opts: Options, bar: tqdm) -> dict[str, str]:
    """Settle every unit on submitted workers (module doc); returns their merged reports once each point has
    its result, else raises StageError."""
    if opts.in_process:
        raise ValueError("one local worker without --gpus runs in the stage's process (InProcess)")
    backend = _Slurm(store, opts) if opts.executor == "slurm" else _Local(store, opts)
    base = bar.n        # points done before these units (reused)
    report: dict[str, str] = {}
    for attempt in range(opts.retries + 1):
        missing = [u for u in units if not settled(store, u)]
        if not missing:
            return report
        if attempt:
            say(f"{len({u.slot for u in missing})} points missing after attempt {attempt}: submitting them again "
                 f"(attempt {attempt + 1} of {opts.retries + 1})")
        backend.submit(missing, min(worker_count(opts, len(missing)), len(missing)))
        backend.wait(lambda: _show(store, units, bar, base))
        for slot, what in backend.reports():
            if what != DONE or slot not in report:   # what a worker did beats another's "found it done"
                report[slot] = what
    missing = sorted({u.slot for u in units if not settled(store, u)})
    if missing:
        raise StageError(f"{len(missing)} points still missing after {opts.retries + 1} attempts "
                         f"({', '.join(missing)}): {backend.failure() or 'the workers ended without them'}; "
                         "finished points are kept, a re-run computes the rest")
    return report


def _show(store: Store, units: list[Unit], bar: tqdm, base: int) -> None:
    points = {u.config_hash: u for u in units}.values()   # a split point's ranges are one point
    landed = sum(written(store, slot, u.config_hash, planned) for u in points
                 for slot, planned in ((u.slot, u.planned), *u.copies))
    if base + landed > bar.n:
        bar.update(base + landed - bar.n)


class _Backend:
    """Submits workers through a submitit executor and follows their logs."""

    def __init__(self, store: Store, opts: Options):
        self.store, self.opts = store, opts
        self.jobs: list = []
        self._echoed: dict[Path, int] = {}

    def _folder(self) -> Path:
        # submitit writes there itself: at least the folder must be a directory of the results, not a link
        with self.store.tree.directory((SUBMITIT,), create=True):
            return self.store.root / SUBMITIT / "%j"

    def _echo(self) -> None:
        """Print the workers' new log lines (they write to submitit's log files, not to this terminal)."""
        for job in self.jobs:
            log = Path(job.paths.stderr)
            try:   # through the store: a FIFO or a link planted as a log is never opened
                text = self.store.tree.read(log)[self._echoed.get(log, 0):]
            except (OSError, ValueError):
                continue
            complete = text[:text.rfind(b"\n") + 1]
            self._echoed[log] = self._echoed.get(log, 0) + len(complete)
            for line in complete.decode(errors="replace").splitlines():
                if line.startswith("worker "):
                    say(line)

    def reports(self) -> list[tuple[str, str]]:
        """(slot, what happened) from every worker that returned (Worker.work); a killed one left none."""
        found = []
        for job in self.jobs:
            if Path(job.paths.result_pickle).exists() and job.exception() is None:
                found += list(job.result().items())
        return found

    def failure(self) -> str | None:
        """What the first failed worker left: its error's last line, or that it left no result at all.
        Only result files are read: asking submitit about a job without one would query sacct and wait."""
        for job in self.jobs:
            if not Path(job.paths.result_pickle).exists():
                return f"job {job.job_id} ended without a result (killed, or its node was lost)"
            error = job.exception()
            if error is not None:
                lines = str(error).strip().splitlines()
                return f"job {job.job_id}: {lines[-1] if lines else repr(error)}"
        return None


def placement(gpus: tuple[int, ...] | None, count: int) -> list[tuple[int | None, int]]:
    """(GPU, workers pinned to it) for each of `count` local workers: worker k gets gpus[k % len(gpus)].
    Without --gpus the workers run on the CPU, (None, 1): CPU timings are marked indicative anyway."""
    if gpus is None:
        return [(None, 1)] * count
    chosen = [gpus[k % len(gpus)] for k in range(count)]
    return [(gpu, chosen.count(gpu)) for gpu in chosen]


class _Local(_Backend):
    def submit(self, units: list[Unit], count: int) -> None:
        self.jobs = []
        workers = placement(self.opts.gpus, count)
        most = max(shared for _, shared in workers)
        if most > 1:
            # Measured on one H200 (README): two workers on one GPU finished the paper-profile R sweep at
            # most 1.16x sooner than one, and the TPOT each measured while the other ran was 2.1x.
            say(f"note: {count} workers on {len(self.opts.gpus)} GPU(s): up to {most} share a GPU and slow "
                 "each other down; their timings are marked as taken on a shared GPU (‡ in the tables). "
                 "Time with one worker per GPU.")
        for k, (gpu, shared) in enumerate(workers):
            executor = submitit.LocalExecutor(folder=self._folder(), max_num_timeout=self.opts.retries)
            visible = () if gpu is None else (gpu,)
            executor.update_parameters(timeout_min=self.opts.time_min, gpus_per_node=len(visible),
                                       visible_gpus=visible)
            self.jobs.append(executor.submit(Task(self.opts.settings, shared), str(self.store.root), units, k,
                                             count))

    def wait(self, show) -> None:
        try:
            while not all(job.done() for job in self.jobs):
                self._echo()
                show()
                time.sleep(POLL_S)
        except BaseException:
            for job in self.jobs:
                job.cancel(check=False)
            raise
        self._echo()
        show()


class _Slurm(_Backend):
    def __init__(self, store: Store, opts: Options):
        super().__init__(store, opts)
        self._partition_states()   # fail early, in one line, when Slurm is not reachable

    def submit(self, units: list[Unit], count: int) -> None:
        executor = submitit.SlurmExecutor(folder=self._folder(), max_num_timeout=self.opts.retries,
                                          python=self.opts.python)
        params = dict(time=self.opts.time_min, array_parallelism=count, job_name="streamkv",
                      gpus_per_task=self.opts.gpus_per_task or None, partition=self.opts.partition,
                      account=self.opts.account)
        executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
        root = str(self.store.root.resolve())
        try:
            self.jobs = executor.map_array(Task(self.opts.settings), [root] * count, [units] * count, range(count), [count] * count)
        except (subprocess.CalledProcessError, OSError) as err:
            raise StageError(f"slurm: sbatch failed: {_last_line(err)}") from None
        say(f"slurm: submitted array job {self.jobs[0].job_id.split('_')[0]} ({count} tasks)")

    def wait(self, show) -> None:
        array = self.jobs[0].job_id.split("_")[0]
        unresponsive_since = None
        try:
            while self._queued(array):
                self._echo()
                show()
                states = self._partition_states()
                # A trailing * is Slurm's "not responding"; the other states name nodes that run nothing.
                if any(not s.endswith("*") and not s.startswith(_NOT_RESPONDING) for s in states):
                    unresponsive_since = None
                else:
                    unresponsive_since = unresponsive_since or time.monotonic()
                    if time.monotonic() - unresponsive_since > NODE_GRACE_S:
                        raise StageError(f"slurm: no node of partition {self.opts.partition or '(default)'} "
                                         f"responds (node states: {' '.join(states) or 'none'}); cancelled array "
                                         f"job {array}; finished points are kept, re-run the stage when the "
                                         "cluster is back")
                time.sleep(POLL_S)
        except BaseException:
            subprocess.run(["scancel", array], capture_output=True, timeout=30)
            raise
        self._echo()
        show()

    def _queued(self, array: str) -> bool:
        out = _slurm(["squeue", "-h", "-j", array, "-o", "%i"], "squeue")
        return bool(out.strip())

    def _partition_states(self) -> list[str]:
        command = ["sinfo", "-h", "-o", "%t"] + (["-p", self.opts.partition] if self.opts.partition else [])
        return _slurm(command, "sinfo").split()


def _slurm(command: list[str], name: str) -> str:
    """The output of a Slurm client command; StageError in one line when Slurm cannot be reached."""
    if shutil.which(command[0]) is None:
        raise StageError(f"slurm is not reachable: {command[0]} is not installed (use --executor local)")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise StageError(f"slurm is not reachable: {name} did not answer within 60 s") from None
    if done.returncode != 0:
        if name == "squeue" and "Invalid job id" in done.stderr:
            return ""     # the array has left the queue (squeue forgets finished jobs after MinJobAge)
        raise StageError(f"slurm is not reachable: {name} failed ({_last_line(done.stderr)})")
    return done.stdout


def _last_line(err) -> str:
    text = str(getattr(err, "stderr", None) or err).strip()
    return text.splitlines()[-1] if text else repr(err)
