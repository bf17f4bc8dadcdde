"""The demo R sweep through a real Slurm (the one-node cluster scripts/slurm_single_node.sh starts; .ci/run
starts it and sets STREAMKV_REQUIRE_SLURM=1, so there a missing cluster fails instead of skipping): the
results equal a local run's, and a node lost mid-array fails the stage in one line, keeps what was
finished, and a re-run computes the rest. No mocks: sbatch, squeue, slurmctld and slurmd are real."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from streamkv import locks
from streamkv.store import Store

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "scripts" / "slurm_single_node.sh"


def _cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


if not _cluster_answers():
    if os.environ.get("STREAMKV_REQUIRE_SLURM") == "1":
        raise RuntimeError("STREAMKV_REQUIRE_SLURM=1 but Slurm does not answer: run scripts/slurm_single_node.sh")
    pytest.skip("no Slurm cluster here (scripts/slurm_single_node.sh starts one, as root)", allow_module_level=True)


def sweeps(results: Path, *flags: str, timeout: int = 900, wait: bool = True, **knobs: str):
    env = {**os.environ, "RESULTS_DIR": str(results), "STREAMKV_PROFILE": "demo", **knobs}
    command = [sys.executable, "-m", "streamkv", "sweeps", *flags]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def results_of(results: Path) -> dict:
    store = Store(results)
    return {e.slot: store.read(e.path) for e in store.scan().entries}


def computed(results: Path) -> Counter:
    found = Counter()
    for log in (results / ".submitit").rglob("*_log.err"):
        found.update(re.findall(r"^worker \d+/\d+: computed (.+) \(", log.read_text(), flags=re.M))
    return found


def node_up() -> None:
    for _ in range(120):
        if re.fullmatch(r"(idle|mix|alloc)\s*", subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True,
                                                              text=True).stdout):
            return
        time.sleep(1)
    raise AssertionError("the Slurm node did not come back")


def test_demo_r_sweep_through_slurm_equals_a_local_run(tmp_path):
    slurm = sweeps(tmp_path / "slurm", "--executor", "slurm", "--workers", "2")
    assert slurm.returncode == 0, slurm.stderr[-3000:]
    assert "slurm: submitted array job" in slurm.stderr
    local = sweeps(tmp_path / "local")
    assert local.returncode == 0, local.stderr[-3000:]
    a, b = results_of(tmp_path / "slurm"), results_of(tmp_path / "local")
    assert sorted(a) == sorted(b) and len(a) == 6        # the baseline and R = 1 4 8 16 32
    for slot in a:
        assert a[slot]["config_hash"] == b[slot]["config_hash"], slot
        assert a[slot]["metrics"]["perplexity"] == b[slot]["metrics"]["perplexity"], slot
    # The baseline was split over the two array tasks and merged; every unit computed once.
    assert set(computed(tmp_path / "slurm").values()) == {1} and len(computed(tmp_path / "slurm")) == 7
    tables = [subprocess.run([sys.executable, "-m", "streamkv", "tables", "--results-dir", str(tmp_path / r),
                              "--out-dir", str(tmp_path / f"tex-{r}")], cwd=REPO, capture_output=True, text=True)
              for r in ("slurm", "local")]
    assert all(t.returncode == 0 for t in tables), [t.stderr[-2000:] for t in tables]
    slurm_table, local_table = (_untimed(tmp_path / f"tex-{r}" / "sweeps.tex") for r in ("slurm", "local"))
    assert slurm_table == local_table and len(slurm_table) == 12   # 6 rows, each with its config_hash line


def _untimed(tex: Path) -> list[str]:
    """The table's rows without the timing columns (TPOT, speedup) and its config_hash comments without
    the file path: what must not depend on where a point ran."""
    kept = []
    for line in tex.read_text().splitlines():
        if line.startswith("% slot="):
            kept.append(line.split(" file=")[0])
        elif line.count("&") == 6 and not line.startswith("Setting"):
            cells = line.split("&")
            kept.append("&".join(cells[:1] + cells[3:]))
    return kept


def test_slurmd_stopped_mid_array_fails_in_one_line_and_a_rerun_finishes(tmp_path):
    results = tmp_path / "results"
    # A smaller budget makes the baseline four times cheaper; this test is about the cluster, not the numbers.
    knobs = {"CAP_TOTAL": "64", "SWEEP_R_VALUES": "1 2 4 8 16 32"}
    stage = sweeps(results, "--executor", "slurm", "--workers", "2", wait=False, **knobs)
    killed = set()
    try:
        # Mid-array: the baseline has landed and the tasks are inside streaming points. The node then goes
        # away with its processes: slurmd stops and the tasks die (a stopped slurmd alone leaves its job
        # steps running to the end).
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            if len(results_of(results)) == 1:
                killed |= _kill_claim_holders(results)
            time.sleep(0.02)
        subprocess.run([str(CLUSTER), "stop-slurmd"], check=True)
        until = time.monotonic() + 2
        while time.monotonic() < until:
            killed |= _kill_claim_holders(results)
            time.sleep(0.02)
        _, err = stage.communicate(timeout=300)
    finally:
        subprocess.run([str(CLUSTER), "start-slurmd"], check=True)
        stage.kill()
    assert killed, "no task was seen inside a point"
    errors = [line for line in err.splitlines() if line.startswith("streamkv: error")]
    assert stage.returncode == 2 and len(errors) == 1, err[-3000:]
    assert "no node of partition" in errors[0] and "finished points are kept" in errors[0]
    kept = results_of(results)
    assert 1 <= len(kept) < 7 and Store(results).scan().problems == []
    node_up()
    rerun = sweeps(results, "--executor", "slurm", "--workers", "2", **knobs)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(kept)} reused" in rerun.stderr
    final = results_of(results)
    assert len(final) == 7 and Store(results).scan().problems == []
    for slot, doc in kept.items():    # finished points were kept, not recomputed
        assert final[slot]["created_utc"] == doc["created_utc"] and final[slot]["config_hash"] == doc["config_hash"]
    print(f"slurmd stopped mid-array: {len(killed)} tasks killed, {len(kept)} of 7 points kept, "
          f"{7 - len(kept)} computed by the re-run, {len(Store(results).scan().problems)} corrupt files")


def _kill_claim_holders(results: Path) -> set[int]:
    """SIGKILL every process holding a claim under results/ (the array tasks inside a point)."""
    pids = set()
    for lock in (results / ".claims").glob("*.lock"):
        pid = locks.holder(lock)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            pids.add(pid)
    return pids
