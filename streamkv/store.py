"""Result files: where each slot lives, atomic writes, and the reuse / stale rules.

Layout under the results directory (RESULTS_DIR, default results/):
- `baselines/{dataset}` -> baselines/{dataset}_baseline_avg.json (the seed guide's names);
- `mit_bench/...` and `runs/...` (ad-hoc `streamkv run`) -> <slot>.json at the top;
- every other slot -> paper_experiments/<slot>.json, e.g. paper_experiments/main/pg19/lazy.json.
Beside a result `<label>.json`: `<label>.nll.f32` (per-token NLL, raw little-endian float32),
`<label>.cache_len.json` (cache length after every step) and, for REPEAT_RUNS > 1, `<label>.run{k}.json`
(one repeat's timings).

Crash safety: every file is written to a temp file in the same directory, fsynced and renamed over its
name. A rewrite first removes the old result JSON, then writes the artifacts, then the JSON: a JSON on
disk therefore always points at artifacts of its own run, and a run killed half-way leaves its slot
missing, so the next run recomputes it.

Reuse rule: a result is current exactly when its config_hash equals the planned one. Anything else in a
slot is stale: `lookup` returns it only with allow_stale, marked, and remembers it for the stage to list.
"""
from __future__ import annotations

import glob
import json
import re
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .files import atomic_write  # re-exported: stages.py and mit.py import it from here
from .schema import SCHEMA_VERSION, Result
from .tables.cells import Cell

RESULT_KINDS = ("run", "mit_reference", "bench")
_TOP_LEVEL = ("mit_bench", "runs")           # slot roots stored as <results>/<slot>.json
_SCANNED = ("baselines", "paper_experiments") + _TOP_LEVEL
_ARTIFACT = re.compile(r"\.(cache_len|run\d+)\.json$")


def _json_bytes(doc) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def nll_bytes(values: Iterable[float]) -> bytes:
    data = array("f", values)
    if sys.byteorder != "little":
        data.byteswap()
    return data.tobytes()


def read_nll(path: Path) -> array:
    data = array("f")
    data.frombytes(Path(path).read_bytes())
    if sys.byteorder != "little":
        data.byteswap()
    return data


@dataclass(frozen=True)
class Entry:
    slot: str
    path: Path
    config_hash: str
    kind: str


@dataclass
class ScanReport:
    entries: list[Entry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # corrupt, foreign or misplaced files: skipped


class Store:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.stale: dict[str, Cell] = {}       # stale results lookup() met, by slot, for the stage to list
        self.problems: dict[str, str] = {}     # unreadable results lookup() met, by slot

    def path(self, slot: str) -> Path:
        parts = slot.split("/")
        if any(p in ("", ".", "..") for p in parts) or len(parts) < 2:
            raise ValueError(f"bad slot {slot!r}")
        if parts[0] == "baselines" and len(parts) == 2:
            return self.root / "baselines" / f"{parts[1]}_baseline_avg.json"
        if parts[0] in _TOP_LEVEL:
            return self.root.joinpath(*parts[:-1], f"{parts[-1]}.json")
        return self.root.joinpath("paper_experiments", *parts[:-1], f"{parts[-1]}.json")

    def write(self, result: Result, *, nll: bytes | None = None, cache_len: list[int] | None = None,
              repeats: list[dict] = (), path: Path | None = None) -> Path:
        """Write a result and its artifacts (at `path`, default the slot's path); returns the JSON path.

        nll: raw little-endian float32 (see nll_bytes); repeats: per-repeat timing metrics, kept as files
        when there is more than one.
        """
        path = Path(path) if path is not None else self.path(result["slot"])
        stem = path.name.removesuffix(".json")
        path.unlink(missing_ok=True)
        for old in path.parent.glob(f"{glob.escape(stem)}.run*.json"):
            old.unlink()
        artifacts: dict = {}
        if nll is not None:
            artifacts["nll"] = f"{stem}.nll.f32"
            atomic_write(path.parent / artifacts["nll"], nll)
        if cache_len is not None:
            artifacts["cache_len"] = f"{stem}.cache_len.json"
            atomic_write(path.parent / artifacts["cache_len"], _json_bytes(cache_len))
        if len(repeats) > 1:
            artifacts["repeats"] = []
            for k, metrics in enumerate(repeats, 1):
                name = f"{stem}.run{k}.json"
                doc = {"schema_version": SCHEMA_VERSION, "kind": "repeat", "slot": result["slot"],
                       "config_hash": result["config_hash"], "repeat": k, "metrics": metrics}
                atomic_write(path.parent / name, _json_bytes(doc))
                artifacts["repeats"].append(name)
        doc = {**result, "schema_version": SCHEMA_VERSION, "artifacts": {**result.get("artifacts", {}), **artifacts}}
        atomic_write(path, _json_bytes(doc))
        return path

    def read(self, path: Path) -> Result:
        """A result file, validated; raises ValueError with a one-line reason when it is unusable."""
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION \
                or doc.get("kind") not in RESULT_KINDS:
            what = {k: doc.get(k) for k in ("schema_version", "kind")} if isinstance(doc, dict) else type(doc)
            raise ValueError(f"{path}: foreign JSON ({what}), not a streamkv result of schema "
                             f"{SCHEMA_VERSION}")
        for key in ("slot", "config_hash", "metrics"):
            if key not in doc:
                raise ValueError(f"{path}: result without {key!r}")
        missing = [a for a in _artifact_names(doc) if not (Path(path).parent / a).is_file()]
        if missing:
            raise ValueError(f"{path}: missing artifacts {missing}")
        return doc

    def copy(self, source: Path, slot: str) -> Path:
        """Store the result at `source` (and its artifacts) again under `slot`: two slots whose specs hash
        equally are the same experiment (e.g. main/pg19/lazy and sweeps/pg19/R=64), computed once."""
        doc = self.read(source)
        names = doc.get("artifacts") or {}

        def artifact(key: str) -> bytes | None:
            return (source.parent / names[key]).read_bytes() if key in names else None

        cache_len = artifact("cache_len")
        repeats = [json.loads((source.parent / n).read_text())["metrics"] for n in names.get("repeats", [])]
        result = {k: v for k, v in doc.items() if k != "artifacts"}
        return self.write({**result, "slot": slot}, nll=artifact("nll"),
                          cache_len=None if cache_len is None else json.loads(cache_len), repeats=repeats)

    def scan(self) -> ScanReport:
        """Every result under the results directory; bad files are reported, never raised."""
        report = ScanReport()
        for top in _SCANNED:
            for path in sorted((self.root / top).rglob("*.json")):
                if path.name.startswith(".") or _ARTIFACT.search(path.name):
                    continue
                try:
                    doc = self.read(path)
                    if self.path(doc["slot"]) != path:
                        raise ValueError(f"{path}: slot {doc['slot']!r} belongs at {self.path(doc['slot'])}")
                except ValueError as e:
                    report.problems.append(str(e))
                    continue
                report.entries.append(Entry(doc["slot"], path, doc["config_hash"], doc["kind"]))
        return report

    def lookup(self, slot: str, expected_hash: str | None, allow_stale: bool) -> Cell | None:
        """The slot's result if current; a stale one (hash differs, or nothing is planned for the slot:
        expected_hash None) only with allow_stale, marked stale. Unreadable files count as missing."""
        path = self.path(slot)
        if not path.is_file():
            return None
        try:
            doc = self.read(path)
        except ValueError as e:
            self.problems[slot] = str(e)
            return None
        cell = Cell(slot=slot, metrics=doc["metrics"], config_hash=doc["config_hash"],
                    stale=doc["config_hash"] != expected_hash, path=path)
        if not cell.stale:
            return cell
        self.stale[slot] = cell
        return cell if allow_stale else None


def _artifact_names(doc: dict) -> list[str]:
    artifacts = doc.get("artifacts") or {}
    names = [v for k, v in artifacts.items() if k != "repeats" and isinstance(v, str)]
    return names + list(artifacts.get("repeats", []))
