"""Workers on this host through submitit's LocalExecutor, on the real demo model with short streams: claims,
a worker killed mid-point (that point is computed again, nothing else), two runs of one stage at once (no
point computed twice, no corrupt JSON), and the settings that choose the executor."""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from tqdm import tqdm

from streamkv import context, executors, locks, plans, profiles, worker
from streamkv.settings import Settings, SettingsError
from streamkv.store import Store

N_TOKENS = 400     # a short demo stream: each point takes a second or two on one CPU thread


def demo_units(results: Path) -> list[worker.Unit]:
    settings = Settings(results_dir=str(results), sweep_r_values=(1, 4, 16))
    profile = profiles.resolve(settings)
    profile = dataclasses.replace(profile, long=dataclasses.replace(profile.long, max_tokens=N_TOKENS))
    ctx = context.context(settings, tokenize=True, profile=profile)
    points = plans.plan(ctx, ["sweeps"])
    return worker.units_of([worker.Unit(p.slot, p.spec) for p in points], split=2)


def holder(results: Path, key: str) -> int | None:
    """The pid of the worker computing unit `key` (its claim, Store.claim), or None."""
    return locks.holder(results / ".claims" / f"{key}.lock")


def computed_lines(results: Path) -> Counter:
    """How often each slot (or baseline range) was computed, from every worker's submitit log."""
    found = Counter()
    for log in (results / executors.SUBMITIT).rglob("*_log.err"):
        found.update(re.findall(r"^worker \d+/\d+: computed (.+) \(", log.read_text(), flags=re.M))
    return found


def run(results: Path, units, workers: int = 2, gpus: tuple[int, ...] | None = None) -> None:
    with tqdm(total=len({u.slot for u in units}), disable=True) as bar:
        executors.run(Store(results), units, executors.Options(workers=workers, gpus=gpus), bar)


def assert_complete_and_clean(results: Path, units) -> None:
    store = Store(results)
    assert all(store.lookup(u.slot, u.config_hash, allow_stale=False) for u in units)
    assert store.scan().problems == []
    assert not list(results.rglob("*.tmp")) and not list((results / worker.PARTS).rglob("*.pt"))


def test_a_claim_names_its_holder_until_the_holder_dies(tmp_path):
    import subprocess
    import sys

    lock = tmp_path / ".claims" / "k.lock"
    held = subprocess.Popen([sys.executable, "-c", (
        "import time; from streamkv import locks\n"
        f"with locks.hold({str(lock)!r}, wait=False) as mine:\n"
        "    print(mine, flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    assert held.stdout.readline().strip() == "True"
    assert locks.holder(lock) == held.pid
    with locks.hold(lock, wait=False) as mine:
        assert mine is False
    held.kill()
    held.wait()
    assert locks.holder(lock) is None
    with locks.hold(lock, wait=False) as mine:
        assert mine is True


def test_two_workers_compute_every_point_once_and_split_the_baseline(tmp_path):
    results = tmp_path / "results"
    units = demo_units(results)
    assert sum(u.part is not None for u in units) == 2            # the baseline, in two token ranges
    run(results, units)
    assert_complete_and_clean(results, units)
    counts = computed_lines(results)
    assert sorted(counts.values()) == [1] * len(units)
    assert len(counts) == len(units)


def test_workers_placed_on_one_gpu_record_that_they_shared_it(tmp_path, capsys):
    assert executors.placement((0, 1), 3) == [(0, 2), (1, 1), (0, 2)]
    assert executors.placement((0, 1), 2) == [(0, 1), (1, 1)]
    assert executors.placement(None, 2) == [(None, 1), (None, 1)]
    # Two workers pinned to "GPU 0" (the demo profile computes on the CPU, so no GPU is needed to see
    # the count travel from the placement through the worker and the runner into every result).
    results = tmp_path / "results"
    units = [u for u in demo_units(results) if u.part is None][:2]
    run(results, units, workers=2, gpus=(0,))
    store = Store(results)
    assert [store.read(store.path(u.slot))["metrics"]["device_shared_by"] for u in units] == [2, 2]
    assert "up to 2 share a GPU" in capsys.readouterr().err
    alone = tmp_path / "alone"
    unit = [u for u in demo_units(alone) if u.part is None][0]
    worker.Worker(Store(alone), Settings()).work([unit])      # one worker in the stage's process: alone on its device
    assert Store(alone).read(Store(alone).path(unit.slot))["metrics"]["device_shared_by"] == 1


def test_a_worker_killed_mid_point_costs_that_point_only(tmp_path):
    results = tmp_path / "results"
    units = demo_units(results)
    victim = next(u for u in units if u.slot.endswith("R=4"))
    killed = []

    def kill_the_holder():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            pid = holder(results, victim.key)
            if pid is not None and not Store(results).path(victim.slot).exists():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_holder)
    killer.start()
    run(results, units)
    killer.join()
    assert killed, "the victim point was never seen in progress"
    assert_complete_and_clean(results, units)
    counts = computed_lines(results)
    # Every unit shows exactly one completed computation: the killed worker never finished the victim, whose
    # claim died with it, so another worker (or the resubmission) computed it; nothing else was redone.
    assert counts == Counter({(u.slot if u.part is None else f"{u.slot} tokens {u.part[0]}..{u.part[1] - 1}"): 1
                              for u in units})


def test_points_whose_workers_all_died_are_submitted_again(tmp_path):
    results = tmp_path / "results"
    units = demo_units(results)
    killed = set()

    def kill_every_worker_once():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(killed) < 2:
            for unit in units:
                pid = holder(results, unit.key)
                if pid is not None and pid not in killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_every_worker_once)
    killer.start()
    run(results, units)          # both first workers die; the second attempt (retries=1) finishes the stage
    killer.join()
    assert len(killed) == 2
    assert_complete_and_clean(results, units)
    assert set(computed_lines(results).values()) == {1}


def test_without_retries_a_dead_worker_fails_the_stage_in_one_line(tmp_path):
    results = tmp_path / "results"
    units = demo_units(results)[:1]  # one baseline range: the only worker dies, nobody takes it over
    victim = units[0]

    def kill_it():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            pid = holder(results, victim.key)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_it)
    killer.start()
    with pytest.raises(context.StageError, match=r"1 points still missing after 1 attempts .*re-run computes the rest"):
        with tqdm(total=1, disable=True) as bar:
            executors.run(Store(results), units, executors.Options(workers=2, retries=0), bar)
    killer.join()


def test_slurm_unreachable_is_one_line(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PATH": "/nonexistent", "RESULTS_DIR": str(tmp_path / "results")}
    done = subprocess.run([sys.executable, "-m", "streamkv", "sweeps", "--executor", "slurm"], env=env,
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("streamkv: error")]
    assert done.returncode == 2 and errors == ["streamkv: error: slurm is not reachable: sinfo is not installed "
                                               "(use --executor local)"], done.stderr[-2000:]
    assert not (tmp_path / "results" / "baselines").exists()


def test_two_runs_of_one_stage_at_once_compute_each_point_once(tmp_path):
    results = tmp_path / "results"
    units = demo_units(results)
    errors = []

    def submit():
        try:
            run(results, units)
        except Exception as err:  # reported below: a thread's exception would otherwise vanish
            errors.append(err)

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert_complete_and_clean(results, units)
    counts = computed_lines(results)
    assert len(counts) == len(units) and set(counts.values()) == {1}


def test_executor_settings(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)   # a 4-GPU host
    assert executors.options(Settings()).in_process
    assert not executors.options(Settings(workers=2)).in_process
    opts = executors.options(Settings(gpus="0,1,3"))
    assert opts.gpus == (0, 1, 3) and executors.worker_count(opts, 10) == 3
    assert executors.worker_count(executors.options(Settings(gpus="0", workers=2)), 10) == 2
    assert executors.worker_count(executors.options(Settings(executor="slurm")), 7) == 7
    for bad, message in [(Settings(gpus="0,x"), "must be all, none"), (Settings(gpus="1,1"), "distinct"),
                         (Settings(executor="k8s"), "must be one of local, slurm"),
                         (Settings(executor="slurm", gpus="0"), "slurm-gpus-per-task"),
                         (Settings(gpus="4"), "torch sees 4 CUDA devices")]:
        with pytest.raises(SettingsError, match=message):
            executors.options(bad)
    with pytest.raises(SettingsError, match="STREAMKV_WORKERS must be >= 1"):
        Settings(workers=0)
