"""Wall time of the paper target, stage by stage, through the real CLI (issue 15, "GPU, end to end").

Runs what `make paper` runs, one stage command at a time as the make targets do (`streamkv baseline`,
`main`, `ablations`, `sweeps`, `mit-reference`, `bench`), then `streamkv paper --no-pdf`, which must find
every point current and only write the tables. Each command is a fresh process, so each pays its own model
load and torch.compile (the compile cache on disk is shared). On a GPU machine without the paper's assets:
    STREAMKV_PROFILE=paper-random MIT_BENCH_GEN_TOKENS=128 python3 scripts/bench_paper_e2e.py --out OUT
Writes OUT/<stage>.log and OUT/e2e.json (rewritten after every stage, so a killed run keeps what it timed);
tables and the PDF are built afterwards, anywhere, from results/ (`make tex`, `make pdf`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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


def run_stage(args: list[str], log: Path) -> tuple[int, float]:
    began = time.perf_counter()
    with log.open("w", encoding="utf-8") as f:
        proc = subprocess.Popen([sys.executable, "-m", "streamkv", *args], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:   # echoed as it comes: a stage killed at the call's limit still shows
            f.write(line)
            sys.stdout.write(line)
        proc.wait()
    return proc.returncode, time.perf_counter() - began


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = load()
    report = {"profile": settings.profile, "mit_bench_gen_tokens": settings.mit_bench_gen_tokens,
              "fingerprint": fingerprint.collect(), "stages": []}
    began = time.perf_counter()
    for name in stages(settings):
        cli = COMMANDS[name]
        rc, wall = run_stage(cli, args.out / f"{name}.log")
        report["stages"].append({"stage": name, "command": "streamkv " + " ".join(cli), "rc": rc, "wall_s": wall})
        report["total_wall_s"] = time.perf_counter() - began
        report["points"] = points(Path(settings.results_dir))
        (args.out / "e2e.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"== {name}: rc {rc}, {wall:.1f} s", file=sys.stderr, flush=True)
        if rc != 0:
            sys.exit(f"stage {name} failed (exit {rc}); see {args.out / f'{name}.log'}")
    for s in report["stages"]:
        print(f"{s['stage']:<10} {s['wall_s']:8.1f} s", file=sys.stderr)
    print(f"{'total':<10} {report['total_wall_s']:8.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
