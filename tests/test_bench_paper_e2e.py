"""scripts/bench_paper_e2e.py over several device calls: a stage stopped at the deadline with its workers,
and a resumed run that keeps the finished stages and sums the interrupted stage's attempts."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_paper_e2e  # noqa: E402


def gone(pid: int) -> bool:
    """The process has exited: no such process, or a zombie nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_stage_past_its_deadline_is_stopped_with_its_workers(tmp_path):
    pid_file = tmp_path / "worker.pid"
    stage = ("import subprocess, sys, time\n"
             "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
             f"open({str(pid_file)!r}, 'w').write(str(w.pid))\n"
             "print('working', flush=True)\n"
             "time.sleep(120)\n")
    rc, wall = bench_paper_e2e.run_stage([sys.executable, "-c", stage], tmp_path / "stage.log", 3)
    assert rc is None and 3 <= wall < 60
    assert "working" in (tmp_path / "stage.log").read_text()
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while not gone(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(worker)


def test_a_stage_that_ends_in_time_keeps_its_exit_code(tmp_path):
    rc, wall = bench_paper_e2e.run_stage([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "s.log", 60)
    assert rc == 3 and wall < 60


def test_a_resumed_run_keeps_finished_stages_and_sums_the_interrupted_attempts(tmp_path, monkeypatch):
    ran = []
    interrupt = {"stage": None}

    def fake_stage(command, log, seconds):
        name = Path(log).stem
        ran.append(name)
        if len(ran) == 2 and interrupt["stage"] is None:   # the second stage of the first run hits the deadline
            interrupt["stage"] = name
            return None, 2.0
        return 0, 1.0 if len(ran) == 1 else 3.0

    monkeypatch.setattr(bench_paper_e2e, "run_stage", fake_stage)
    monkeypatch.setattr(bench_paper_e2e, "points", lambda results: [])
    with pytest.raises(SystemExit, match="--resume"):
        bench_paper_e2e.main(["--out", str(tmp_path), "--deadline", "500"])
    first, second = ran
    bench_paper_e2e.main(["--out", str(tmp_path), "--resume"])
    report = json.loads((tmp_path / "e2e.json").read_text())
    names = [s["stage"] for s in report["stages"]]
    assert names == bench_paper_e2e.stages(bench_paper_e2e.load()) and names[:2] == [first, second]
    assert ran.count(first) == 1 and ran.count(second) == 2           # the finished stage never ran again
    by_name = {s["stage"]: s for s in report["stages"]}
    assert by_name[first]["attempts"] == [1.0]
    assert by_name[second]["attempts"] == [2.0, 3.0] and by_name[second]["wall_s"] == 5.0
    assert all(s["rc"] == 0 for s in report["stages"]) and len(report["runs"]) == 2
    assert report["total_wall_s"] == sum(s["wall_s"] for s in report["stages"])
    assert "attempts_carried" not in report


def test_resume_refuses_a_run_of_another_profile(tmp_path, monkeypatch):
    (tmp_path / "e2e.json").write_text(json.dumps({"profile": "paper", "mit_bench_gen_tokens": 128,
                                                   "fingerprint": {}, "stages": [], "runs": []}))
    monkeypatch.setenv("STREAMKV_PROFILE", "demo")
    with pytest.raises(SystemExit, match="profile='paper'"):
        bench_paper_e2e.main(["--out", str(tmp_path), "--resume"])
