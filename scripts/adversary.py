#!/usr/bin/env python3
"""Try every hostile input of issue 16 against a streamkv, as a user sharing its results directory would,
and say how each ended: one command for the next pass.

    python scripts/adversary.py                          # the streamkv package beside this script
    python scripts/adversary.py --package /tmp/old/streamkv --only 4a,6a

Each case runs in a sandbox of its own under a temp directory: a copy of the package and of data/ (so that
the sandbox is the repository root whose .env and results/ the commands use), the results of one `main` run
on the demo profile (made once per pass, by the package under test), then the planted link, FIFO, device
node or edit, then the commands, as subprocesses with a timeout and a 4 GiB address-space limit (so that
reading /dev/zero ends in a MemoryError instead of taking the machine). Nothing outside the temp directory
is planted or touched; the victims are files in the sandbox's parent, outside its results/.

Outcomes: `clean` (refused in one `streamkv: error:` line with exit 2, or, for a command that only reads,
the bad file reported and skipped), `harm` (a victim outside results/ was written or removed, a secret
was printed, a device node was replaced, a hand-edited number reached a table or was reused),
`traceback` (a Python traceback, or killed by a signal), `silent accept` (exit 0 and not a word), `hang`
(still running after --timeout seconds). Exit status: 0 when every case is clean.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parents[1]
VICTIM = "precious: not streamkv's\n"
SECRET = "alice:$6$SECRETHASH$abc:19000:0:99999:7:::\n"   # a line of /etc/shadow
TAMPERED = "1.2345"
LIMIT_AS = 4 << 30
FAST = {"REPEAT_RUNS": "1", "WARMUP_RUNS": "0", "STREAMKV_PROFILE": "demo", "RUN_MIT_BENCH": "0"}
RUN = ["run", "--cap-total", "32", "--max-eval-tokens", "64", "--repeat-runs", "1", "--warmup-runs", "0"]


@dataclass
class Sandbox:
    root: Path       # the repository root of the sandbox
    outside: Path    # beside it, outside results/: victims live here

    @property
    def results(self) -> Path:
        return self.root / "results"

    def slot_dir(self, dataset: str = "demo-short") -> Path:
        return self.results / "paper_experiments" / "main" / dataset

    def victim(self, name: str = "victim.txt") -> Path:
        path = self.outside / name
        path.write_text(VICTIM)
        return path


@dataclass
class Ran:
    args: list[str]
    rc: int | None   # None: timed out
    out: str
    err: str


@dataclass
class Case:
    name: str
    what: str
    plant: Callable[[Sandbox], dict]              # returns extra environment for the commands
    commands: list[list[str]]
    expect: str                                   # "refuse" (exit 2, one line) | "report" (exit 0, named)
    harm: Callable[[Sandbox, list[Ran]], str | None] = lambda box, ran: None
    named: str = ""                               # "report": what stderr must mention


# ------------------------------------------------------------------------------------------ plantings
def _drop_short_main(box: Sandbox) -> None:
    """demo-short's Start+Recent and Lazy results removed: `main` must compute (and claim, and write) them."""
    for file in box.slot_dir().iterdir():
        file.unlink()


def _short_hashes(box: Sandbox) -> list[str]:
    return [json.loads(p.read_text())["config_hash"] for p in sorted(box.slot_dir().glob("*.json"))
            if p.name.count(".") == 1]


def _victim_changed(name: str = "victim.txt"):
    def check(box: Sandbox, ran: list[Ran]) -> str | None:
        path = box.outside / name
        if not path.exists():
            return f"{path} was removed"
        return None if path.read_text() == VICTIM else f"{path} was overwritten"
    return check


def plant_lock_link(box: Sandbox) -> dict:
    _drop_short_main(box)
    (box.slot_dir() / ".lazy.lock").symlink_to(box.victim())
    return {}


def plant_claim_links(box: Sandbox) -> dict:
    hashes = _short_hashes(box)
    _drop_short_main(box)
    claims = box.results / ".claims"
    claims.mkdir(exist_ok=True)
    for h in hashes:
        (claims / f"{h}.lock").symlink_to(box.victim())
    return {}


def plant_probe_links(box: Sandbox) -> dict:
    # The probe was .write-probe.<pid>: planted over the next pids this machine will hand out.
    _drop_short_main(box)
    victim = box.victim()
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    for pid in range(last + 1, last + 400):
        (box.results / f".write-probe.{pid}").symlink_to(victim)
    return {}


def plant_slot_dir_link(box: Sandbox) -> dict:
    _drop_short_main(box)
    box.slot_dir().rmdir()
    outside = box.outside / "x"
    outside.mkdir()
    for name in ("lazy.0123456789ab.nll.f32", ".lazy.json.abc123.tmp", "strict.json"):
        (outside / name).write_text(VICTIM)
    box.slot_dir().symlink_to(outside)
    return {}


def _outside_dir_changed(box: Sandbox, ran: list[Ran]) -> str | None:
    found = sorted(p.name for p in (box.outside / "x").iterdir())
    if found != [".lazy.json.abc123.tmp", "lazy.0123456789ab.nll.f32", "strict.json"]:
        return f"the linked directory now holds {found}"
    return None if all(p.read_text() == VICTIM for p in (box.outside / "x").iterdir()) else "a file there was rewritten"


def plant_top_link(box: Sandbox) -> dict:
    _drop_short_main(box)
    (box.slot_dir() / "lazy.0123456789ab.nll.f32").write_text(VICTIM)
    top = box.results / "paper_experiments"
    shutil.move(str(top), str(box.outside / "x"))
    top.symlink_to(box.outside / "x")
    return {}


def _top_link_harm(box: Sandbox, ran: list[Ran]) -> str | None:
    short = box.outside / "x" / "main" / "demo-short"
    found = sorted(p.name for p in short.iterdir())
    return None if found == ["lazy.0123456789ab.nll.f32"] else f"the linked directory now holds {found}"


def output_at(make: Callable[[Path], Path]):
    def plant(box: Sandbox) -> dict:
        return {"OUTPUT": str(make(box.root / "out.json"))}
    return plant


def _mkfifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _null_node(path: Path) -> Path:
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))   # a copy of /dev/null's node (root)
    return path


def _node_replaced(box: Sandbox, ran: list[Ran]) -> str | None:
    mode = os.lstat(box.root / "out.json").st_mode
    return None if stat.S_ISCHR(mode) else "the device node was replaced by a regular file"


def _fifo_result(box: Sandbox) -> dict:
    lazy = box.slot_dir("demo-long") / "lazy.json"
    lazy.unlink()
    os.mkfifo(lazy)
    return {}


def _deep(where: str):
    def plant(box: Sandbox) -> dict:
        folder = box.slot_dir("demo-long")
        target = {"result": folder / "lazy.json", "index": box.results / "streams" / "demo-long.json",
                  "cache_len": next(iter(sorted(folder.glob("lazy.*cache_len.json"))), folder / "lazy.cache_len.json")}
        target[where].write_text("[" * 100000 + "]" * 100000)
        return {}
    return plant


def _edit(how: str):
    def plant(box: Sandbox) -> dict:
        path = box.slot_dir("demo-long") / "lazy.json"
        doc = json.loads(path.read_text())
        m = doc["metrics"]
        m["perplexity"] = float(TAMPERED)
        if how in ("consistent", "artifact"):
            m["nll_sum"] = m["n_predicted_tokens"] * math.log(float(TAMPERED))
        if how == "artifact":
            nll = array("f", [math.log(float(TAMPERED))] * m["n_predicted_tokens"])
            (path.parent / doc["artifacts"]["nll"]).write_bytes(nll.tobytes())
        if how == "drop":
            m.pop("nll_sum", None)
            m.pop("n_predicted_tokens", None)
            doc["artifacts"].pop("nll", None)
        path.write_text(json.dumps(doc))
        return {}
    return plant


def _tampered_shown(box: Sandbox, ran: list[Ran]) -> str | None:
    shown = [r for r in ran if TAMPERED[:5] in r.out or TAMPERED[:5] in r.err]
    tex = "".join(p.read_text() for p in (box.root / "NeurIPS" / "generated").glob("*.tex")) \
        if (box.root / "NeurIPS" / "generated").is_dir() else ""
    if shown or TAMPERED[:5] in tex:
        return "the hand-edited perplexity reached a table"
    return None


def _tampered_reused(box: Sandbox, ran: list[Ran]) -> str | None:
    # the stage's summary: "main: 6 points: 5 reused, 0 copied from an equal spec, 1 computed, ..."
    computed = [int(n) for r in ran for n in re.findall(r", (\d+) computed, ", r.err)]
    return "the hand-edited result was reused" if computed == [0] else None


def _artifact_link(box: Sandbox) -> dict:
    folder = box.slot_dir("demo-long")
    doc = json.loads((folder / "lazy.json").read_text())
    nll = folder / doc["artifacts"]["nll"]
    shutil.move(str(nll), str(box.outside / "victim.nll.f32"))
    nll.symlink_to(box.outside / "victim.nll.f32")
    return {}


def _dotenv(text: str | None = None, *, make: Callable[[Path], object] | None = None):
    def plant(box: Sandbox) -> dict:
        dotenv = box.root / ".env"
        if make is not None:
            make(dotenv)
        else:
            dotenv.write_text(text)
        return {}
    return plant


def _dotenv_link_to_secret(box: Sandbox) -> dict:
    secret = box.outside / "shadow"
    secret.write_text(SECRET)
    (box.root / ".env").symlink_to(secret)
    return {}


def _secret_printed(box: Sandbox, ran: list[Ran]) -> str | None:
    return "a line of the linked file was printed" if any("SECRETHASH" in r.err + r.out for r in ran) else None


def _long_echo(box: Sandbox, ran: list[Ran]) -> str | None:
    return "an error echoed more than 300 characters" if any(len(r.err) > 300 for r in ran) else None


def _doubling(box: Sandbox) -> dict:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    lines = ["A=xxxxxxxxxxxxxxxx"] + [f"{c}=${p}${p}" for p, c in zip(letters, letters[1:])]
    (box.root / ".env").write_text("\n".join(lines) + "\n")
    return {}


def _empty_env_hides(box: Sandbox) -> dict:
    (box.root / ".env").write_text(f"RESULTS_DIR={box.outside / 'mine'}\n")
    return {"RESULTS_DIR": ""}


def _needs_compute(box: Sandbox) -> dict:
    _drop_short_main(box)
    return {}


CASES = [
    Case("1a", "slot lock .lazy.lock linked to a victim", plant_lock_link, [["main"]], "refuse", _victim_changed()),
    Case("1b", "claims .claims/<hash>.lock linked to a victim", plant_claim_links, [["main"]], "refuse",
         _victim_changed()),
    Case("1c", "write probes .write-probe.<next pids> linked to a victim", plant_probe_links, [["main"]], "ok",
         _victim_changed()),
    Case("2", "slot directory main/demo-short linked outside", plant_slot_dir_link, [["main"]], "refuse",
         _outside_dir_changed),
    Case("2b", "results/paper_experiments itself linked outside", plant_top_link, [["main"]], "refuse",
         _top_link_harm),
    Case("3a", "run --output a FIFO", output_at(_mkfifo), [RUN + ["--output", "{OUTPUT}"]], "refuse"),
    Case("3b", "run --output a copy of /dev/null's node", output_at(_null_node), [RUN + ["--output", "{OUTPUT}"]],
         "refuse", _node_replaced),
    Case("3c", "run --output /dev/zero", output_at(lambda p: Path("/dev/zero")), [RUN + ["--output", "{OUTPUT}"]],
         "refuse"),
    Case("3d", "run --output /dev/full", output_at(lambda p: Path("/dev/full")), [RUN + ["--output", "{OUTPUT}"]],
         "refuse"),
    Case("3e", "run --output /dev/stdout", output_at(lambda p: Path("/dev/stdout")),
         [RUN + ["--output", "{OUTPUT}"]], "refuse"),
    Case("4a", "a FIFO named lazy.json: status", _fifo_result, [["status"]], "report", named="lazy.json"),
    Case("4b", "a FIFO named lazy.json: tables", _fifo_result, [["tables"]], "report", named="lazy.json"),
    Case("4c", "a FIFO named lazy.json: main", _fifo_result, [["main"]], "refuse"),
    Case("5a", "deep JSON in a result: status", _deep("result"), [["status"]], "report", named="lazy.json"),
    Case("5b", "deep JSON in a result: tables", _deep("result"), [["tables"]], "report", named="lazy.json"),
    Case("5c", "deep JSON in a result: main", _deep("result"), [["main"]], "report", named="lazy.json"),
    Case("5d", "deep JSON in the stream index: status", _deep("index"), [["status"]], "report",
         named="demo-long.json"),
    Case("5e", "deep JSON in a cache_len artifact: tables", _deep("cache_len"), [["tables"]], "report",
         named="cache_len"),
    Case("6a", "perplexity edited: tables", _edit("perplexity"), [["tables"]], "report", _tampered_shown,
         named="lazy.json"),
    Case("6b", "perplexity edited: main", _edit("perplexity"), [["main"]], "report", _tampered_reused,
         named="lazy.json"),
    Case("6c", "perplexity and nll_sum edited to agree: tables", _edit("consistent"), [["tables"]], "report",
         _tampered_shown, named="lazy.json"),
    Case("6d", "perplexity, nll_sum and the NLL artifact edited: tables", _edit("artifact"), [["tables"]],
         "report", _tampered_shown, named="lazy.json"),
    Case("6e", "perplexity edited, nll_sum and the artifact dropped: tables", _edit("drop"), [["tables"]],
         "report", _tampered_shown, named="lazy.json"),
    Case("6f", "the NLL artifact replaced by a link outside: tables", _artifact_link, [["tables"]], "report",
         named="nll.f32"),
    Case("7a", "MODEL_NAME=/no/such/dir@abc", lambda box: {"MODEL_NAME": "/no/such/dir@abc"},
         [["run", "--profile", "paper"]], "refuse"),
    Case("7b", "CPU_THREADS=100000", lambda box: {"CPU_THREADS": "100000"}, [RUN], "refuse"),
    Case("7c", ".env linked to a file with a line of /etc/shadow", _dotenv_link_to_secret, [["status"]], "refuse",
         _secret_printed),
    Case("7d", "a 5000-character bad value", _dotenv("CAP_TOTAL=" + "x" * 5000 + "\n"), [["status"]], "refuse",
         _long_echo),
    Case("7e", ".env lines that double each other (16 x 2^25 characters)", _doubling, [["status"]], "refuse"),
    Case("8a", "main --gpus 0 without CUDA", _needs_compute, [["main", "--gpus", "0"]], "refuse"),
    Case("8b", "main --workers 2 --gpus 0 without CUDA", _needs_compute, [["main", "--workers", "2", "--gpus", "0"]],
         "refuse"),
    Case("8c", "run --dataset ''", lambda box: {}, [RUN + ["--dataset", ""]], "refuse"),
    Case("8d", "--slurm-python with the local executor", _needs_compute, [["main", "--slurm-python", "python3"]],
         "refuse"),
    Case("8e", ".env is a directory", _dotenv(make=lambda p: p.mkdir()), [["status"]], "refuse"),
    Case("8f", ".env is a FIFO", _dotenv(make=os.mkfifo), [["status"]], "refuse"),
    Case("8g", ".env is a dangling link", _dotenv(make=lambda p: p.symlink_to(p.parent / "absent")), [["status"]],
         "refuse"),
    Case("8h", "RESULTS_DIR= empty in the environment hides .env's", _empty_env_hides, [["status"]], "refuse"),
]


# ------------------------------------------------------------------------------------------- running
def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))
    os.setsid()   # the timeout kills the whole group


def streamkv(root: Path, args: list[str], env: dict, timeout: float) -> Ran:
    # No knob of the caller's environment: only what a shell needs, the fast timing protocol and the case's.
    environ = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    environ.update({**FAST, "PYTHONPATH": str(root), **env})
    proc = subprocess.Popen([sys.executable, "-m", "streamkv", *args], cwd=root, env=environ, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_limits, errors="replace")
    try:
        out, err = proc.communicate(timeout=timeout)
        return Ran(args, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        return Ran(args, None, out, err)


def _sandbox(base: Path, name: str, package: Path, seed: Path | None) -> Sandbox:
    root = base / name / "repo"
    outside = base / name
    shutil.copytree(package, root / "streamkv", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(HERE / "data", root / "data", symlinks=True)
    if seed is not None:
        shutil.copytree(seed, root / "results", symlinks=True)
    return Sandbox(root, outside)


def outcome(case: Case, box: Sandbox, ran: list[Ran]) -> tuple[str, str]:
    last = ran[-1]
    text = "\n".join(r.err + r.out for r in ran)
    if any(r.rc is None for r in ran):
        return "hang", ""
    harm = case.harm(box, ran)
    if harm:
        return "harm", harm
    if "Traceback (most recent call last)" in text or any(r.rc < 0 for r in ran):
        line = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "")
        return "traceback", f"rc {last.rc}: {line[:150]}"
    errors = [ln for ln in last.err.splitlines() if ln.startswith("streamkv: error: ")]
    if last.rc == 2 and len(errors) == 1:
        return "clean", errors[0][:150]
    if last.rc == 0 and case.expect == "ok":
        return "clean", "exit 0, nothing outside touched"
    if last.rc == 0 and case.expect == "report":
        said = [ln for ln in last.err.splitlines() if case.named in ln and ("problem" in ln or "skipped" in ln
                                                                           or "warning" in ln)]
        if said:
            return "clean", said[0][:150]
    if last.rc == 0:
        return "silent accept", "exit 0"
    return "traceback", f"rc {last.rc}: {(last.err.strip().splitlines() or [''])[-1][:150]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, default=HERE / "streamkv", help="the streamkv package to attack")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a command counts as a hang")
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--keep", action="store_true", help="keep the sandboxes (their path is printed)")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.only or c.name in args.only.split(",")]
    base = Path(tempfile.mkdtemp(prefix="streamkv-adversary."))
    try:
        seed_box = _sandbox(base, "seed", args.package.resolve(), None)
        made = streamkv(seed_box.root, ["main"], {}, timeout=600)
        if made.rc != 0:
            print(f"seed `main` failed (rc {made.rc}): {made.err[-2000:]}", file=sys.stderr)
            return 2
        counts: dict[str, int] = {}
        for case in cases:
            box = _sandbox(base, case.name, args.package.resolve(), seed_box.results)
            env = case.plant(box)
            commands = [[a.format(**env) for a in c] for c in case.commands]
            ran = [streamkv(box.root, c, {k: v for k, v in env.items() if k != "OUTPUT"}, args.timeout)
                   for c in commands]
            result, detail = outcome(case, box, ran)
            counts[result] = counts.get(result, 0) + 1
            print(f"{case.name:>3}  {result:<13}  {case.what}" + (f"\n       {detail}" if detail else ""), flush=True)
            if not args.keep:
                shutil.rmtree(base / case.name, ignore_errors=True)
        order = ("clean", "harm", "traceback", "silent accept", "hang")
        print(f"\n{len(cases)} cases tried: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in order))
        return 0 if counts.get("clean", 0) == len(cases) else 1
    finally:
        if args.keep:
            print(f"sandboxes kept in {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
