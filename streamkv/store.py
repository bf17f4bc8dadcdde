"""Result files: where each slot lives, atomic writes, and the reuse / stale rules.

Layout under the results directory (RESULTS_DIR, default results/):
- `baselines/{dataset}` -> baselines/{dataset}_baseline_avg.json (the seed guide's names);
- the slots of stages stored at the top (streamkv/experiments: `mit_bench/...`) and `runs/...` (ad-hoc
  `streamkv run`) -> <slot>.json at the top;
- every other slot -> paper_experiments/<slot>.json, e.g. paper_experiments/main/pg19/lazy.json.
Beside a result `<label>.json`: `<label>.nll.f32` (per-token NLL, raw little-endian float32),
`<label>.cache_len.json` (cache length after every step) and, for REPEAT_RUNS > 1, `<label>.run{k}.json`
(one repeat's timings).

Artifact names carry the first 12 hex digits of their content's sha256 (`lazy.3f2a9c1b0d4e.nll.f32`).

Crash and full-disk safety: a write never touches what the previous result of the slot refers to until
the new result is complete. Every file goes to a temp file in the same directory, fsynced and renamed
(streamkv.files.atomic_write); the new artifacts land under their own content-addressed names, then the
JSON is renamed over the old one, and only then are artifacts no JSON refers to removed. A kill or a full
disk at any moment therefore leaves the old result with its artifacts, or the new one with its own. A
failed write removes the files it made and raises StoreError, one line naming the directory.

Concurrency: each slot's files are written under the slot's lock (streamkv.locks); holding it, the writer
also removes temp files and unreferenced artifacts that killed writers left behind (`sweep` does the same
for every slot that nobody is writing).

Shared directories: every file under the results directory is reached through streamkv.confined (no link
followed, only regular files read, replaced or removed, bounded reads), so a link, FIFO or device node
planted in results/ makes a command stop or skip in one line naming it, never read, write or delete outside.

Integrity: a result records the sha256 of each artifact it points to (`artifact_sha256`), and a reader
re-derives what it can (streamkv.schema.check_derived: nll_sum and the token count from the NLL artifact,
the perplexity from them). A result that fails is unusable, like a corrupt one: reported in one line,
recomputed by the stages, never shown in a table; the message never quotes the disagreeing numbers.

Reuse rule: a result is current exactly when its config_hash equals the planned one. Anything else in a
slot is stale: `lookup` returns it only with allow_stale, marked, and remembers it for the stage to list.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from . import experiments, locks
from .confined import Refused, Tree, loads
from .schema import SCHEMA_VERSION, Result, check_derived, validate

RESULT_KINDS = ("run", "mit_reference")
_ARTIFACT = re.compile(r"\.(cache_len|run\d+)\.json$")
_TEMP = re.compile(r"^\.(?P<target>.+)\.[^.]+\.tmp$")   # atomic_write's temp names: .<target>.<random>.tmp


class StoreError(RuntimeError):
    """A results directory that cannot be read or written (full, read-only, not a directory); one line."""


def _artifact_of(stem: str) -> re.Pattern:
    # <stem>.<sha12>.<kind>, and the fixed names earlier versions wrote (<stem>.nll.f32, ...)
    return re.compile(rf"{re.escape(stem)}\.([0-9a-f]{{12}}\.)?(nll\.f32|cache_len\.json|run\d+\.json)")


def _named(stem: str, kind: str, data: bytes) -> tuple[str, bytes]:
    return f"{stem}.{_sha256(data)[:12]}.{kind}", data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _problem(err: OSError) -> str:
    return err.strerror or type(err).__name__


def _json_bytes(doc) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def nll_bytes(values: Iterable[float]) -> bytes:
    data = array("f", values)
    if sys.byteorder != "little":
        data.byteswap()
    return data.tobytes()


def nll_values(raw: bytes) -> array:
    """The per-token NLL values of an `nll` artifact's bytes (see nll_bytes)."""
    data = array("f")
    data.frombytes(raw)   # ValueError unless whole float32s
    if sys.byteorder != "little":
        data.byteswap()
    return data


def read_nll(path: Path) -> array:
    return nll_values(Tree(Path(path).parent).read(path))


@dataclass(frozen=True)
class Cell:
    """A result as the store hands it to a reader (tables, figures): only what the reuse rules allow."""

    slot: str                    # stage/dataset/label, e.g. "main/pg19/lazy"
    metrics: dict                # the result's "metrics" (streamkv.schema.Metrics)
    config_hash: str             # of the result's spec; printed beside every row that uses it
    stale: bool = False          # the spec no longer matches the current plan (ALLOW_STALE_RESULTS=1)
    path: Path | str | None = None  # the result JSON, printed for traceability
    artifacts: dict = field(default_factory=dict)   # artifact key -> file path (see Store.write)

    def metric(self, key: str):
        """The metric, or None when the result does not record it."""
        return self.metrics.get(key)

    @property
    def timed_on_shared_device(self) -> bool:
        """Other workers were placed on this run's GPU (more --workers than --gpus): its timings may include
        their work. Placement, not observed overlap: a worker alone at the end of a stage is marked too."""
        return (self.metric("device_shared_by") or 1) > 1


def read_cache_len(path: Path) -> list[int]:
    """A `cache_len` artifact: the cache length after every step; ValueError when it is not one."""
    try:
        lengths = Tree(Path(path).parent).read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if not isinstance(lengths, list) or not lengths or not all(type(n) is int for n in lengths):
        raise ValueError(f"{path}: not a non-empty list of ints")
    return lengths


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
        self.tree = Tree(self.root)            # every file below the root is reached through it
        self.stale: dict[str, Cell] = {}       # stale results lookup() met, by slot, for the stage to list
        self.problems: dict[str, str] = {}     # unreadable results lookup() met, by slot

    def path(self, slot: str) -> Path:
        parts = slot.split("/")
        if any(p in ("", ".", "..") for p in parts) or len(parts) < 2:
            raise ValueError(f"bad slot {slot!r}")
        if parts[0] == experiments.get(experiments.BASELINE).slots and len(parts) == 2:
            return self.root / parts[0] / f"{parts[1]}_baseline_avg.json"   # the seed guide's name
        if parts[0] in experiments.top_level():
            return self.root.joinpath(*parts[:-1], f"{parts[-1]}.json")
        return self.root.joinpath(experiments.GRID, *parts[:-1], f"{parts[-1]}.json")

    def _tree(self, path: Path) -> Tree:
        """The tree a result path lies in: the results directory, or for `run --output` elsewhere, the
        directory the user named."""
        try:
            self.tree.parts(path)
        except ValueError:
            return Tree(Path(path).parent)
        return self.tree

    @staticmethod
    def _lock_file(path: Path) -> Path:
        return path.parent / f".{path.name.removesuffix('.json')}.lock"

    def _claim_file(self, config_hash: str) -> Path:
        return self.root / ".claims" / f"{config_hash}.lock"

    def lock(self, path: Path):
        """The lock of the result at `path` and its artifacts (re-entrant); every writer holds it."""
        return locks.hold(self._lock_file(path), root=self._tree(path).root)

    def claim(self, config_hash: str, *, wait: bool):
        """The claim on computing one experiment (streamkv.locks.hold: yields whether it is ours); held
        while a stage computes, copies or skips a point of that hash, so no two runs compute it twice."""
        return locks.hold(self._claim_file(config_hash), wait=wait, root=self.root)

    def identity(self, slot: str, config_hash: str) -> tuple | None:
        """The slot's result file as it is now (inode, mtime, size), None when absent. Refused (one line)
        when its directory, the file, its lock or the hash's claim is a link or not a regular file: a stage
        stops before it computes a point it could not write."""
        path = self.path(slot)
        for file in (self._lock_file(path), self._claim_file(config_hash)):
            self.tree.is_file(file)
        st = self.tree.lstat(path)
        if st is None:
            return None
        self.tree.is_file(path)
        return st.st_ino, st.st_mtime_ns, st.st_size

    def write(self, result: Result, *, nll: bytes | None = None, cache_len: list[int] | None = None,
              repeats: list[dict] = (), path: Path | None = None) -> Path:
        """Write a result and its artifacts (at `path`, default the slot's path); returns the JSON path.

        nll: raw little-endian float32 (see nll_bytes); repeats: per-repeat timing metrics, kept as files
        when there is more than one. Artifacts the result already names (MIT's log) must be beside it.
        Raises StoreError (the previous result kept) when it cannot write.
        """
        path = Path(path) if path is not None else self.path(result["slot"])
        tree, stem = self._tree(path), path.name.removesuffix(".json")
        files: dict = {}
        if nll is not None:
            files["nll"] = _named(stem, "nll.f32", nll)
        if cache_len is not None:
            files["cache_len"] = _named(stem, "cache_len.json", _json_bytes(cache_len))
        if len(repeats) > 1:
            files["repeats"] = [
                _named(stem, f"run{k}.json", _json_bytes({
                    "schema_version": SCHEMA_VERSION, "kind": "repeat", "slot": result["slot"],
                    "config_hash": result["config_hash"], "repeat": k, "metrics": metrics}))
                for k, metrics in enumerate(repeats, 1)]
        artifacts = {k: [n for n, _ in v] if k == "repeats" else v[0] for k, v in files.items()}
        doc = {**result, "schema_version": SCHEMA_VERSION, "artifacts": {**result.get("artifacts", {}), **artifacts}}
        blobs = dict(f for v in files.values() for f in (v if isinstance(v, list) else [v]))
        try:
            with self.lock(path):
                self._tidy(path)
                doc["artifact_sha256"] = {name: _sha256(blobs[name]) if name in blobs
                                          else _sha256(tree.read(path.parent / name)) for name in _artifact_names(doc)}
                made = []
                try:
                    for name, data in blobs.items():
                        if not self._holds(tree, path.parent / name, doc["artifact_sha256"][name]):
                            made.append(path.parent / name)
                            tree.write(made[-1], data)
                    tree.write(path, _json_bytes(doc))
                except BaseException:
                    for file in made:
                        tree.unlink(file)
                    raise
                self._tidy(path)   # the old result's artifacts, now that nothing refers to them
        except OSError as err:
            raise StoreError(f"cannot write {path.name} in {path.parent}: {_problem(err)}; nothing there was "
                             "replaced (a previous result, if any, is kept)") from None
        return path

    @staticmethod
    def _holds(tree: Tree, file: Path, sha256: str) -> bool:
        """Whether `file` is there with these bytes already (content-addressed: an equal artifact)."""
        try:
            return _sha256(tree.read(file)) == sha256
        except FileNotFoundError:
            return False

    def _tidy(self, path: Path) -> list[Path]:
        """Remove, beside the result at `path`, temp files and artifacts its JSON does not refer to: what a
        killed or failed writer left. Only under the slot's lock, when no writer can be half-way."""
        tree, stem = self._tree(path), path.name.removesuffix(".json")
        try:
            keep = set(_artifact_names(tree.read_json(path)))
        except (OSError, ValueError, AttributeError, TypeError):
            keep = set()   # absent or unreadable: none of its artifacts can be used
        artifact = _artifact_of(stem)
        removed = []
        for name, _ in tree.listing(path.parent):
            temp = _TEMP.fullmatch(name)
            target = temp and temp["target"]
            if ((target and (target == path.name or artifact.fullmatch(target) or target == f"{stem}.log"))
                    or (artifact.fullmatch(name) and name not in keep)) and tree.unlink(path.parent / name):
                removed.append(path.parent / name)
        return removed

    def sweep(self) -> list[Path]:
        """Tidy every slot that no other process is writing; returns the files removed."""
        results = set()
        for top in experiments.result_directories():
            for file, mode in self.tree.walk(self.root / top):
                name = file.name.lstrip(".")
                if stat.S_ISREG(mode) and not name.endswith(".lock"):
                    results.add(file.parent / f"{name.split('.')[0]}.json")
        removed = []
        for path in sorted(results):
            with locks.hold(path.parent / f".{path.stem}.lock", wait=False, root=self.root) as mine:
                if mine:
                    removed += self._tidy(path)
        return removed

    def check_writable(self) -> None:
        """Before a stage computes anything: the results directory exists (or is created) and takes files."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"results directory {self.root} is not a directory")
        # One byte takes a block: a full disk fails here, not after a run. A fresh name each time, so that
        # nothing planted under it can stand in the way.
        probe = self.root / f".write-probe.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            self.tree.write(probe, b"\0")
            self.tree.unlink(probe)
        except OSError as err:
            raise StoreError(f"results directory {self.root} cannot be written: {_problem(err)}") from None

    def check_readable(self, *, must_exist: bool) -> bool:
        """Whether the results directory exists; StoreError when it is something else, or absent and
        `must_exist` (a directory named explicitly: a typo must not read as "no results yet")."""
        if self.root.is_dir():
            return True
        if self.root.exists():
            raise StoreError(f"results directory {self.root} is not a directory")
        if must_exist:
            raise StoreError(f"results directory {self.root} does not exist")
        return False

    def read(self, path: Path) -> Result:
        """A result file, validated and checked against its artifacts (module doc); raises ValueError with
        a one-line reason when it is unusable."""
        path, tree = Path(path), self._tree(Path(path))
        try:
            doc = tree.read_json(path)
        except Refused as e:
            raise ValueError(str(e)) from None
        except OSError as e:
            raise ValueError(f"{path}: unreadable ({_problem(e)})") from None
        if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION \
                or doc.get("kind") not in RESULT_KINDS:
            if isinstance(doc, dict) and doc.get("schema_version") == 2 and doc.get("kind") in RESULT_KINDS:
                raise ValueError(f"{path}: written before results recorded their artifacts' sha256 (schema 2): "
                                 "it cannot be checked, so it is computed again (once)")
            what = {k: doc.get(k) for k in ("schema_version", "kind")} if isinstance(doc, dict) else type(doc)
            raise ValueError(f"{path}: foreign JSON ({what}), not a streamkv result of schema "
                             f"{SCHEMA_VERSION}")
        try:
            validate(doc)
        except ValueError as e:
            raise ValueError(f"{path}: invalid result ({e})") from None
        contents, missing = {}, []
        for name in _artifact_names(doc):
            try:
                contents[name] = tree.read(path.parent / name)
            except FileNotFoundError:
                missing.append(name)
                continue
            except OSError as e:
                raise ValueError(f"{path}: artifact {name}: {_problem(e)}") from None
            if _sha256(contents[name]) != doc["artifact_sha256"][name]:
                raise ValueError(f"{path}: artifact {name} is not the file this result was written with (its "
                                 "sha256 differs): the result is not used")
        if missing:
            raise ValueError(f"{path}: missing artifacts {missing}")
        nll = (doc.get("artifacts") or {}).get("nll")
        try:
            check_derived(doc, None if nll is None else nll_values(contents[nll]))
        except ValueError as e:
            raise ValueError(f"{path}: {e}: the result is not used (edited after it was written?)") from None
        return doc

    def copy(self, source: Path, slot: str) -> Path:
        """Store the result at `source` (and its artifacts) again under `slot`: two slots whose specs hash
        equally are the same experiment (e.g. main/pg19/lazy and sweeps/pg19/R=64), computed once."""
        doc, tree = self.read(source), self._tree(source)
        names = doc.get("artifacts") or {}

        def artifact(key: str) -> bytes | None:
            return tree.read(source.parent / names[key]) if key in names else None

        cache_len = artifact("cache_len")
        repeats = [tree.read_json(source.parent / n)["metrics"] for n in names.get("repeats", [])]
        result = {k: v for k, v in doc.items() if k not in ("artifacts", "artifact_sha256")}
        return self.write({**result, "slot": slot}, nll=artifact("nll"),
                          cache_len=None if cache_len is None else loads(cache_len, str(source)), repeats=repeats)

    def scan(self) -> ScanReport:
        """Every result under the results directory; bad files (links and special files among them) are
        reported, never raised."""
        report = ScanReport()
        for top in experiments.result_directories():
            try:
                found = list(self.tree.walk(self.root / top))
            except Refused as e:   # the top directory itself is a link or a file
                report.problems.append(str(e))
                continue
            for path, mode in found:
                if stat.S_ISLNK(mode) or (not stat.S_ISREG(mode) and path.name.endswith(".json")):
                    try:
                        self.tree.is_file(path)
                    except OSError as e:
                        report.problems.append(str(e))
                if not path.name.endswith(".json") or path.name.startswith(".") or _ARTIFACT.search(path.name) \
                        or not stat.S_ISREG(mode):
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
        try:
            if self.tree.lstat(path) is None:
                return None
            doc = self.read(path)
        except (OSError, ValueError) as e:
            self.problems[slot] = str(e)
            return None
        artifacts = {k: path.parent / v for k, v in (doc.get("artifacts") or {}).items() if isinstance(v, str)}
        cell = Cell(slot=slot, metrics=doc["metrics"], config_hash=doc["config_hash"],
                    stale=doc["config_hash"] != expected_hash, path=path, artifacts=artifacts)
        if not cell.stale:
            return cell
        self.stale[slot] = cell
        return cell if allow_stale else None


def _artifact_names(doc: dict) -> list[str]:
    artifacts = doc.get("artifacts") or {}
    names = [v for k, v in artifacts.items() if k != "repeats" and isinstance(v, str)]
    return names + list(artifacts.get("repeats", []))
