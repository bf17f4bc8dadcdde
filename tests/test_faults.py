"""Fault injection: a full or read-only disk, kill -9 inside a write, concurrent runs on one results
directory.

What must hold: no good result is ever lost or left corrupt, and no point is computed twice. (Hostile and
bad input: tests/test_hostile_inputs.py.)
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from streamkv import context, files, plans, stages
from streamkv.store import Store, StoreError, read_nll

from conftest import FakeRunner, assert_one_line_error, worker_main
from fault_workers import NEW_NLL, OLD_NLL, SLOT, write_parts

TESTS = Path(__file__).resolve().parent
WORKER_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}


def slot_files(store: Store) -> list[str]:
    return sorted(p.name for p in store.path(SLOT).parent.iterdir())


def assert_old_result_whole(store: Store, files_before: list[str]) -> None:
    doc = store.read(store.path(SLOT))          # valid JSON, schema, artifacts present
    assert doc["config_hash"] == "a" * 64
    assert list(read_nll(store.path(SLOT).parent / doc["artifacts"]["nll"])) == OLD_NLL
    assert slot_files(store) == files_before    # nothing of the failed write is left


# ------------------------------------------------------------------------------- full or read-only disk
def _fail_fsync_of(target: str, code: int, monkeypatch) -> None:
    """The disk fills (or turns read-only) while the file whose name contains `target` is written."""
    real = files.os.fsync

    def fsync(fd):
        if target in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
@pytest.mark.parametrize("target", ["nll.f32", "cache_len", "run2", "lazy.json"])
def test_a_failed_rewrite_keeps_the_previous_result(tmp_path, monkeypatch, code, target):
    store = Store(tmp_path / "results")
    write_parts(store, "a" * 64, OLD_NLL)
    before = slot_files(store)
    _fail_fsync_of(target, code, monkeypatch)
    with pytest.raises(StoreError) as err:
        write_parts(store, "b" * 64, NEW_NLL)
    message = str(err.value)
    assert str(store.path(SLOT).parent) in message and os.strerror(code) in message and "\n" not in message
    assert_old_result_whole(store, before)


def test_a_read_only_results_directory_fails_in_one_line_before_computing(invoke, faked, tmp_path, monkeypatch):
    _fail_fsync_of(".write-probe.", errno.EROFS, monkeypatch)   # the probe file cannot be made to last
    result = invoke("main")
    results = tmp_path / "results"
    assert_one_line_error(result, f"results directory {results} cannot be written: Read-only", results)
    assert faked == []   # no runner was made: nothing was computed


_CLONE_FS, _CLONE_NEWNS = 0x00000200, 0x00020000            # <sched.h>
_MS_REC, _MS_PRIVATE, _MNT_DETACH = 0x4000, 0x40000, 2      # <sys/mount.h>


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs: a disk that really fills up. Needs mount(2), i.e. root (CI runs as root).

    It is mounted in a private mount namespace that only this thread (and the processes and threads it
    starts) enters: unshare(CLONE_NEWNS), left again with setns(2). Nobody else ever sees the mount, and
    nothing can leave it behind: the kernel drops it with the namespace when pytest dies in the middle of
    the test (kill -9 included). Skipped where the namespace or the mount cannot be made."""
    mount = tmp_path / "disk"
    mount.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "unshare") or not hasattr(libc, "setns"):
        pytest.skip("no unshare(2)/setns(2) here: the tmpfs needs a private mount namespace (Linux)")
    home = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY)
    cwd = os.open(".", os.O_RDONLY)   # setns(2) moves the thread to the namespace's root
    try:
        if libc.unshare(_CLONE_NEWNS) != 0:
            pytest.skip(f"cannot make a private mount namespace here: {os.strerror(ctypes.get_errno())}")
        try:
            # The copies of the mounts turn private, so that the tmpfs does not propagate back out.
            if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
                pytest.skip(f"cannot make the mounts private here: {os.strerror(ctypes.get_errno())}")
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                  capture_output=True)
            if done.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
            yield mount
        finally:
            # Back home. A thread started during the test (tqdm's monitor) shares this thread's filesystem
            # context and stays in the namespace: unmount the tmpfs now rather than when that thread ends,
            # and take a context of our own, which setns(2) requires.
            libc.umount2(bytes(mount), _MNT_DETACH)
            if libc.unshare(_CLONE_FS) != 0 or libc.setns(home, _CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), f"cannot leave the tmpfs's mount namespace: "
                                                  f"{os.strerror(ctypes.get_errno())}")
            os.fchdir(cwd)
    finally:
        os.close(home)
        os.close(cwd)


def test_main_on_a_really_full_disk_loses_nothing(invoke, faked, tiny_disk):
    results = tiny_disk / "results"
    assert invoke("main", env={"RESULTS_DIR": str(results)}).exit_code == 0
    store = Store(results)
    good = {e.slot: store.read(e.path) for e in store.scan().entries}
    assert len(good) == 6
    with pytest.raises(OSError) as full, open(tiny_disk / "filler", "wb", buffering=0) as filler:
        while True:   # fill the disk to the last block
            filler.write(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC
    result = invoke("main", "-f", env={"RESULTS_DIR": str(results)})
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        f"streamkv: error: results directory {results} cannot be written: No space left on device"]
    # A disk that fills while a point is written: the store's own error, and the point's old result kept.
    old = store.read(store.path("main/long/lazy"))
    with pytest.raises(StoreError, match=f"in {store.path('main/long/lazy').parent}: No space left"):
        store.write(old, nll=bytes(8192), cache_len=list(range(2000)))
    after = store.scan()
    assert after.problems == [] and {e.slot: store.read(e.path) for e in after.entries} == good   # 0 lost


# ------------------------------------------------------------------------------------- kill -9 in a write
@pytest.mark.parametrize("phase", ["nll.f32", "run2", "lazy.json", "tidy"])
def test_kill_9_inside_the_write_step_leaves_a_whole_result_and_the_sweep_cleans_up(tmp_path, phase):
    store = Store(tmp_path / "results")
    write_parts(store, "a" * 64, OLD_NLL)
    before = slot_files(store)
    worker = subprocess.Popen([sys.executable, str(TESTS / "fault_workers.py"), "write", str(store.root), phase],
                              env=WORKER_ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline() == "blocked\n"
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.wait()
    assert worker.returncode == -signal.SIGKILL
    assert store.scan().problems == []                      # 0 corrupt files
    doc = store.read(store.path(SLOT))
    expected = NEW_NLL if phase == "tidy" else OLD_NLL      # the JSON rename is the commit point
    assert list(read_nll(store.path(SLOT).parent / doc["artifacts"]["nll"])) == expected
    assert slot_files(store) != before                     # the killed write left files behind
    removed = store.sweep()
    assert removed and all(p.parent == store.path(SLOT).parent for p in removed)
    if phase != "tidy":
        assert_old_result_whole(store, before)
    else:
        kept = {store.path(SLOT).name, doc["artifacts"]["nll"], doc["artifacts"]["cache_len"],
                *doc["artifacts"]["repeats"]}
        assert set(slot_files(store)) == kept


def test_the_sweep_leaves_a_slot_alone_while_another_process_writes_it(tmp_path):
    store = Store(tmp_path / "results")
    path = write_parts(store, "a" * 64, OLD_NLL)
    temp = path.parent / ".lazy.json.x1y2z3.tmp"
    temp.write_text("{")
    holder = subprocess.Popen([sys.executable, str(TESTS / "fault_workers.py"), "hold",
                               str(path.parent / ".lazy.lock")], env=WORKER_ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert store.sweep() == [] and temp.exists()        # someone may be writing it: not ours to remove
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert store.sweep() == [temp] and not temp.exists()    # its writer is dead: the lock died with it


def test_a_stage_run_removes_what_killed_writes_left(fakes, capsys):
    profile, settings = fakes
    ctx = context.context(settings(), tokenize=True, profile=profile)
    points = plans.plan(ctx, ["main"])
    stages.execute(ctx, points, runner=FakeRunner(ctx.store))
    folder = ctx.store.path("main/long/lazy").parent
    leftovers = [folder / ".lazy.json.abc123.tmp", folder / "lazy.0123456789ab.nll.f32",
                 folder / ".strict.0123456789ab.run1.json.q.tmp"]
    for file in leftovers:
        file.write_bytes(b"partial")
    runner = FakeRunner(ctx.store)
    stages.execute(ctx, points, runner=runner)
    assert runner.computed == [] and not any(f.exists() for f in leftovers)
    said = capsys.readouterr().err
    assert all(f"removed what a killed write left: {f}" in said for f in leftovers)


# ----------------------------------------------------------------------------------------- concurrency
RUNS = 3


def concurrent_run(tmp: str) -> None:
    """One of the concurrent runs (`python tests/test_faults.py <tmp>`): every stage of the fake profile
    (conftest.worker_main), whose first computation stops at the test's barrier: it says
    `computing <slot>` and waits for `go` on stdin (or ends at EOF, when the test is gone)."""
    run, first = FakeRunner.run, []

    def run_after_the_barrier(self, slot, spec, **kw):
        if not first:
            first.append(slot)
            print(f"computing {slot}", flush=True)
            if sys.stdin.readline() != "go\n":
                raise SystemExit("the test went away before the barrier opened")
        return run(self, slot, spec, **kw)

    FakeRunner.run = run_after_the_barrier
    worker_main(tmp, "0.2")


def test_concurrent_runs_on_one_results_directory_compute_each_point_once(tmp_path, fakes):
    """Three runs at once. No sleep decides the outcome: each run's first computation waits until all three
    are computing (the barrier), so they overlap however the machine schedules them. Each run's first point
    is then one that nobody else holds (the claims), and every later point meets the others' claims and
    results. A run that ignored the claims would start on the same point as the others, and compute it again."""
    profile, settings = fakes   # the runs build the same fake profile in tmp_path
    runs = [subprocess.Popen([sys.executable, __file__, str(tmp_path)], env=WORKER_ENV, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(RUNS)]
    watchdog = threading.Timer(120, lambda: [r.kill() for r in runs])   # a hang fails the test, never blocks it
    watchdog.start()
    try:
        first = [r.stdout.readline().split() for r in runs]   # each run at its first computation
        if not all(f[:1] == ["computing"] for f in first):      # a run ended (or hung) before: its stderr
            for r in runs:
                r.kill()
            pytest.fail(f"a run never reached its first computation: {[r.communicate()[1][-2000:] for r in runs]}")
        for r in runs:                                           # all three computing: open the barrier
            r.stdin.write("go\n")
            r.stdin.flush()
        outputs = [r.communicate() for r in runs]
    finally:
        watchdog.cancel()
        for r in runs:
            if r.poll() is None:
                r.kill()
                r.wait()
    assert [r.returncode for r in runs] == [0] * RUNS, [err[-2000:] for _, err in outputs]
    ctx = context.context(settings(), tokenize=True, profile=profile)
    points = plans.plan(ctx, plans.paper_stages(settings()))
    hash_of = {p.slot: p.spec.config_hash() for p in points}
    assert len({hash_of[slot] for _, slot in first}) == RUNS                 # held at once: 3 experiments
    computed = Counter(line.split()[1] for out, _ in outputs for line in out.splitlines())
    assert max(computed.values()) == 1                                      # 0 points computed twice
    assert all(f"computed {slot}\n" in out for (_, slot), (out, _) in zip(first, outputs))   # the work was split
    assert {context.classify(ctx, p) for p in points} == {"current"}
    assert len(computed) == len(set(hash_of.values()))                      # equal specs copied, not redone
    assert ctx.store.scan().problems == []


if __name__ == "__main__":
    concurrent_run(*sys.argv[1:])
