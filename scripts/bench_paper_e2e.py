"""Wall time of the paper target, stage by stage, through the real CLI (issue 15, "GPU, end to end").

Runs what `make paper` runs, one stage command at a time as the make targets do (`streamkv baseline`,
`main`, `ablations`, `sweeps`, `mit-reference`, `bench`), then `streamkv paper --no-pdf`, which must find
every point current and only write the tables. Each command is a fresh process, so each pays its own model
load and torch.compile (the compile cache on disk is shared); `make paper` itself (`streamkv paper`) plans
every stage in one process and pays them once, so this errs long by a stage start each (README). On a GPU
machine without the paper's assets:
    STREAMKV_PROFILE=paper-random MIT_BENCH_GEN_TOKENS=128 python3 scripts/bench_paper_e2e.py --out OUT
(minutes), or at the paper's stream lengths, what the paper profile costs (about 23 minutes stage by stage on
one H100, projected):
    STREAMKV_PROFILE=paper-random-full python3 scripts/bench_paper_e2e.py --out OUT --deadline 540 [--resume]
Writes OUT/<stage>.log and OUT/e2e.json (rewritten after every stage, so a killed run keeps what it timed);
tables and the PDF are built afterwards, anywhere, from results/ (`make tex`, `make pdf`).

Longer than one device call (the paper profile's ~23 minutes against a call's 10): `--deadline S` stops the
stage still running S seconds after the start (its whole process group; finished points are already in
results/, a killed worker's claim is released with its lock) and records it as interrupted with its time so
far; `--resume` then reads OUT/e2e.json, skips the stages that finished, runs the interrupted one again (it
reuses every point it had finished) and the rest. A stage's time is the sum of its attempts, so a resumed
stage pays its process start and torch.compile once more than an uninterrupted `make paper` would: the
total errs long. Resuming refuses another profile, MIT_BENCH_GEN_TOKENS or commit than the run it continues.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # runs from a bare checkout, no install needed

from streamkv import fingerprint  # noqa: E402
from streamkv.plans import paper_stages  # noqa: E402
from streamkv.settings import load  # noqa: E402
from streamkv.store import Store  # noqa: E402

# Stage -> the CLI arguments of its Makefile target.
COMMANDS = {"baseline": ["baseline"], "main": ["main"], "ablations": ["ablations"], "sweeps": ["sweeps"],
            "mit": ["mit-reference"], "bench": ["bench"], "paper": ["paper", "--no-pdf"]}


def stages(settings) -> list[str]:
    """`make paper`'s stages (RUN_ABLATIONS, RUN_SWEEPS, RUN_MIT_BENCH as it reads them), with MIT's reference
    always in its place: without RUN_MIT_REFERENCE and MIT_REPO it ends in its one "skipped" line, which the
    log keeps; then `paper` itself."""
    names = list(paper_stages(settings))
    if "mit" not in names:
        names.insert(names.index("bench") if "bench" in names else len(names), "mit")
    return names + ["paper"]


def run_stage(command: list[str], log: Path, seconds: float | None) -> tuple[int | None, float]:
    """(exit code, or None if stopped after `seconds`; wall time) of one stage's command."""
    began = time.perf_counter()
    with log.open("a", encoding="utf-8") as f:   # a resumed stage appends its next attempt
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True)   # its own process group: its workers stop with it
        stopped = threading.Event()

        def stop():
            if proc.poll() is None:   # not when it finished just before the deadline
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                    stopped.set()
                except ProcessLookupError:
                    pass
        timer = threading.Timer(max(seconds, 0), stop) if seconds is not None else None
        if timer:
            timer.start()
        for line in proc.stdout:   # echoed as it comes: a stage killed at the call's limit still shows
            f.write(line)
            sys.stdout.write(line)
        proc.wait()
        if timer:
            timer.cancel()
    return (None if stopped.is_set() else proc.returncode), time.perf_counter() - began


def resumed(report: dict, previous: dict) -> dict[str, list[float]]:
    """Make `report` continue `previous` (the e2e.json of an earlier, interrupted run): its finished stages
    and runs carried over; returns the interrupted stage's attempts so far. Refuses other settings or code."""
    for key in ("profile", "mit_bench_gen_tokens"):
        if previous.get(key) != report[key]:
            raise SystemExit(f"--resume: the earlier run had {key}={previous.get(key)!r}, this one {report[key]!r}")
    before, now = previous["fingerprint"].get("git_commit"), report["fingerprint"].get("git_commit")
    if before != now:
        raise SystemExit(f"--resume: the earlier run was at commit {before}, this checkout is at {now}")
    report["stages"] = [s for s in previous["stages"] if s["rc"] == 0]
    report["runs"] = previous.get("runs", []) + report["runs"]
    return {s["stage"]: s["attempts"] for s in previous["stages"] if s["rc"] is None}


def record_stage(report: dict, name: str, cli: list[str], rc: int | None, attempts: list[float]) -> None:
    report["stages"].append({"stage": name, "command": "streamkv " + " ".join(cli), "rc": rc,
                             "attempts": attempts, "wall_s": sum(attempts)})
    report["total_wall_s"] = sum(s["wall_s"] for s in report["stages"])


def points(results: Path) -> list[dict]:
    """What each result says about how it was made: engines, timing, its own wall time."""
    store, rows = Store(results), []
    for entry in store.scan().entries:
        doc = store.read(entry.path)
        m, spec = doc["metrics"], doc["spec"]
        rows.append({"slot": doc["slot"], "config_hash": doc["config_hash"], "created_utc": doc["created_utc"],
                     "random_weights": spec["model"]["random_weights"], "n_tokens": spec["data"]["n_tokens"],
                     "engines": doc["engines"], "tpot_ms": m["tpot_ms"], "wall_s": m["wall_s"],
                     "repeat_runs": len(m["repeat_runs"]), "perplexity": m["perplexity"]})
    return sorted(rows, key=lambda r: r["created_utc"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline", type=float, help="seconds after which the running stage is stopped and "
                        "recorded as interrupted (a device call's limit less slack)")
    parser.add_argument("--resume", action="store_true", help="continue the run recorded in OUT/e2e.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = load()
    report = {"profile": settings.profile, "mit_bench_gen_tokens": settings.mit_bench_gen_tokens,
              "fingerprint": fingerprint.collect(), "stages": [], "runs": [{"began_utc": time.time()}]}
    carried = resumed(report, json.loads((args.out / "e2e.json").read_text())) if args.resume else {}
    began = time.perf_counter()
    done = {s["stage"] for s in report["stages"]}
    for name in stages(settings):
        if name in done:
            continue
        cli = COMMANDS[name]
        left = None if args.deadline is None else args.deadline - (time.perf_counter() - began)
        if left is not None and left <= 0:
            sys.exit(f"deadline ({args.deadline:.0f} s) reached before stage {name}; "
                     f"continue with --resume --out {args.out}")
        rc, wall = run_stage([sys.executable, "-m", "streamkv", *cli], args.out / f"{name}.log", left)
        record_stage(report, name, cli, rc, carried.pop(name, []) + [wall])
        report["runs"][-1]["wall_s"] = time.perf_counter() - began
        report["points"] = points(Path(settings.results_dir))
        (args.out / "e2e.json").write_text(json.dumps(report, indent=2) + "\n")
        if rc is None:
            sys.exit(f"stage {name} stopped at the deadline ({args.deadline:.0f} s) after {wall:.1f} s; "
                     f"continue with --resume --out {args.out}")
        print(f"== {name}: rc {rc}, {wall:.1f} s", file=sys.stderr, flush=True)
        if rc != 0:
            sys.exit(f"stage {name} failed (exit {rc}); see {args.out / f'{name}.log'}")
    for s in report["stages"]:
        print(f"{s['stage']:<10} {s['wall_s']:8.1f} s", file=sys.stderr)
    print(f"{'total':<10} {report['total_wall_s']:8.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
