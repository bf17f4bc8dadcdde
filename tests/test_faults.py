"""Fault injection: a full or read-only disk, kill -9 inside a write, concurrent runs on one results
directory, hostile checkpoints, hostile result JSON, bad command lines and foreign working directories.

What must hold: no good result is ever lost or left corrupt, no point is computed twice, no checkpoint code
runs, and every failure is one `streamkv: error: ...` line with exit code 2.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from streamkv import assets, context, files, plans, reports, stages
from streamkv.assets import AssetError
from streamkv.spec import ModelSpec
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
    def read_only(self, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)
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


# ------------------------------------------------------------------------------------ hostile checkpoints
EVIL = "import pathlib; pathlib.Path({marker!r}).write_text('ran')\n"


@pytest.fixture
def hostile_checkpoint(tmp_path):
    """A checkpoint whose config and tokenizer config map classes to its own Python files, each of which
    leaves a marker file when imported."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (folder / f"{module}.py").write_text(EVIL.format(marker=str(marker)))
    (folder / "model.safetensors").write_bytes(b"not weights")
    return folder, marker


@pytest.mark.parametrize("loader", [assets.load_config, assets.load_tokenizer, assets.load_model])
@pytest.mark.parametrize("precheck", [True, False])
def test_a_checkpoint_that_ships_code_is_refused_and_nothing_runs(hostile_checkpoint, monkeypatch, loader, precheck):
    folder, marker = hostile_checkpoint
    spec = ModelSpec(name=str(folder), revision=files.sha256_file(folder / "model.safetensors"), dtype="float32")
    if not precheck:   # the second line of defence: transformers itself, told trust_remote_code=False
        monkeypatch.setattr(assets, "refuse_remote_code", lambda folder, name: None)
    with pytest.raises(AssetError) as err:
        loader(spec)
    assert "\n" not in str(err.value) and not marker.exists()
    if precheck:
        assert "ships its own Python code" in str(err.value) and "trust_remote_code=False" in str(err.value)


def test_the_cli_refuses_a_hostile_model_name_in_one_line(invoke, hostile_checkpoint, tmp_path):
    folder, marker = hostile_checkpoint
    stream = assets.REPO / assets.DEMO_STREAMS["demo-short"]
    result = invoke("run", "--profile", "paper", "--dataset", "pg19",
                    env={"MODEL_NAME": str(folder), "PG19_SAMPLE_FILE": str(stream)})
    assert_one_line_error(result, "ships its own Python code", tmp_path / "results")
    assert not marker.exists()


# ----------------------------------------------------------------------------------- hostile result JSON
HOSTILE = {
    "main/long/lazy": {"metrics": {"perplexity": "12.5"}},                       # a string perplexity
    "main/long/strict": {"metrics": None},                                       # null metrics
    "main/short/lazy": {"metrics": {"perplexity": None}},                        # no perplexity
    "main/short/strict": {"metrics": {"perplexity": 9.0, "n_predicted_tokens": True}},   # a bool count
    "baselines/long": {"artifacts": {"nll": "../../../../etc/passwd"}},          # an artifact outside
    "baselines/short": {"config_hash": "not-a-hash"},
}


def test_hostile_result_json_is_reported_never_rendered_and_recomputed(fakes):
    profile, settings = fakes
    ctx = context.context(settings(), tokenize=True, profile=profile)
    points = plans.plan(ctx, ["main"])
    stages.execute(ctx, points, runner=FakeRunner(ctx.store))
    for slot, change in HOSTILE.items():
        path = ctx.store.path(slot)
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    report = reports.write_tables(settings(), ctx.store.root / "gen", profile=profile)   # `make tex`
    assert len(report.problems) == len(HOSTILE) and all("invalid result" in p for p in report.problems)
    assert "12.5" not in report.text and "[INSERT DATA]" in report.text
    runner = FakeRunner(ctx.store)
    stages.execute(ctx, plans.plan(ctx, ["main"]), runner=runner)             # `make main`
    assert sorted(runner.computed) == sorted(HOSTILE)
    assert reports.write_tables(settings(), ctx.store.root / "gen", profile=profile).problems == []


# ---------------------------------------------------------------------------------- bad command lines
def _not_utf8(tmp_path: Path) -> dict:
    (tmp_path / ".env").write_bytes(b"CAP_TOTAL=256\nMIT_REPO=caf\xe9\n")
    return {}


def _results_file(tmp_path: Path) -> dict:
    (tmp_path / "afile").write_text("x")
    return {"RESULTS_DIR": str(tmp_path / "afile")}


def _out_dir_file(tmp_path: Path) -> dict:
    (tmp_path / "results").mkdir()
    (tmp_path / "afile").write_text("x")
    return {}


BAD = [  # (command line, environment set-up, message)
    (["main"], _results_file, "is not a directory"),
    (["status"], _results_file, "is not a directory"),
    (["tables"], _results_file, "is not a directory"),
    (["status", "--results-dir", "absent"], None, "does not exist"),
    (["tables", "--results-dir", "absent"], None, "does not exist"),
    (["tables", "--out-dir", "afile"], _out_dir_file, "afile"),
    (["pdf", "--neurips-dir", "absent"], None, "not found"),
    (["status"], _not_utf8, "not UTF-8 text (byte 0xe9"),
    (["main", "--results-dir", ""], None, "RESULTS_DIR / --results-dir is empty"),
    (["run", "--results-dir", ""], None, "RESULTS_DIR / --results-dir is empty"),
    (["run", "--mode", "baseline", "--window-size", "0"], None, "window must be > 0"),
    (["baseline", "--runs", "0"], None, "0 is not in the range x>=1"),
    (["run", "--cap-total", str(10 ** 30)], None, "covers all"),
    (["main", "--cap-total", "64"], None, "covers all 64 tokens of long"),
]


@pytest.mark.parametrize("args, setup, message", BAD)
def test_bad_inputs_end_in_one_line(invoke, faked, tmp_path, args, setup, message):
    env = setup(tmp_path) if setup else {}
    result = invoke(*args, env=env)
    assert_one_line_error(result, message, tmp_path / "results")
    assert faked == [] or faked[-1].computed == []


def test_status_and_tables_on_the_default_results_dir_say_it_is_absent(invoke, faked, tmp_path):
    for command in ("status", "tables"):
        result = invoke(command)
        assert result.exit_code == 0, result.output
        assert f"note: results directory {tmp_path / 'results'} does not exist yet" in result.stderr


def test_a_broken_stream_index_is_named(invoke, faked, tmp_path):
    assert invoke("main").exit_code == 0
    index = tmp_path / "results" / "streams" / "long.json"
    index.write_text(index.read_text()[:20])   # truncated
    result = invoke("status")
    assert result.exit_code == 0 and f"stream index {index} is unreadable" in result.stderr


# ------------------------------------------------------------------------------------ working directory
def test_the_working_directory_changes_no_path(invoke, faked, tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("REPEAT_RUNS=2\n")
    elsewhere = tmp_path / "NeurIPS"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert invoke("main").exit_code == 0 and invoke("tables").exit_code == 0
    assert (tmp_path / "results" / "baselines" / "long_baseline_avg.json").is_file()
    assert (tmp_path / "NeurIPS" / "generated" / "tables.tex").is_file()
    assert not (elsewhere / "results").exists() and not (elsewhere / "NeurIPS").exists()
    lazy = json.loads((tmp_path / "results" / "paper_experiments" / "main" / "long" / "lazy.json").read_text())
    assert lazy["spec"]["measure"]["repeat_runs"] == 2   # the root's .env, read from a subdirectory


if __name__ == "__main__":
    concurrent_run(*sys.argv[1:])
