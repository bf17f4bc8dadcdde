"""Result store: slot layout, atomic writes, artifacts, scan of bad files, reuse and stale rules."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from streamkv import confined, files as files_mod
from streamkv.schema import SCHEMA_VERSION
from streamkv.store import Store, read_nll

from conftest import scored


def result(slot: str, config_hash: str = "a" * 64, nll=(1.0,)) -> dict:
    """A result whose metrics agree with the NLL artifact `put` writes beside it."""
    return {"kind": "run", "slot": slot, "config_hash": config_hash, "spec": {}, "metrics": scored(list(nll))[1]}


def put(store: Store, slot: str, config_hash: str = "a" * 64, nll=(1.0,), **artifacts):
    return store.write(result(slot, config_hash, nll), nll=scored(list(nll))[0], **artifacts)


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "results")


@pytest.mark.parametrize("slot, path", [
    ("baselines/pg19", "baselines/pg19_baseline_avg.json"),
    ("main/pg19/lazy", "paper_experiments/main/pg19/lazy.json"),
    ("sweeps/pg19/R=64", "paper_experiments/sweeps/pg19/R=64.json"),
    ("ablations/demo-long/lazy_no_sink", "paper_experiments/ablations/demo-long/lazy_no_sink.json"),
    ("mit_bench/pg19_mit_reference", "mit_bench/pg19_mit_reference.json"),
    ("runs/pg19/0123456789ab", "runs/pg19/0123456789ab.json"),
])
def test_slot_layout(store, slot, path):
    assert store.path(slot) == store.root / path


@pytest.mark.parametrize("slot", ["main", "main/../../etc/x", "main//lazy", ""])
def test_bad_slots_are_refused(store, slot):
    with pytest.raises(ValueError):
        store.path(slot)


def test_write_puts_artifacts_beside_the_json(store):
    path = put(store, "main/pg19/lazy", nll=[0.25, 1.5, 3.0], cache_len=[4, 5, 4],
                       repeats=[{"tpot_ms": 1.0}, {"tpot_ms": 1.2}])
    doc = store.read(path)
    assert doc["schema_version"] == SCHEMA_VERSION
    names = doc["artifacts"]
    # <label>.<first 12 hex of the content's sha256>.<kind>: a rewrite never overwrites the old result's files
    raw = (path.parent / names["nll"]).read_bytes()
    assert names["nll"] == f"lazy.{hashlib.sha256(raw).hexdigest()[:12]}.nll.f32"
    assert re.fullmatch(r"lazy\.[0-9a-f]{12}\.cache_len\.json", names["cache_len"])
    assert [re.sub(r"\.[0-9a-f]{12}\.", ".", n) for n in names["repeats"]] == ["lazy.run1.json", "lazy.run2.json"]
    assert len(raw) == 12 and raw[:4] == b"\x00\x00\x80\x3e"  # 0.25 as little-endian float32
    assert list(read_nll(path.parent / names["nll"])) == [0.25, 1.5, 3.0]
    assert json.loads((path.parent / names["repeats"][1]).read_text())["metrics"] == {"tpot_ms": 1.2}
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(["lazy.json", names["nll"], names["cache_len"],
                                                                   *names["repeats"]])


def test_one_repeat_writes_no_repeat_files_and_a_rewrite_drops_old_ones(store):
    put(store, "main/pg19/lazy", repeats=[{}, {}, {}])
    path = put(store, "main/pg19/lazy", repeats=[{}])
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(["lazy.json", store.read(path)["artifacts"]["nll"]])


def test_atomic_write_leaves_the_old_file_when_interrupted(store, monkeypatch):
    target = store.root / "x.json"
    files_mod.atomic_write(target, b"old")

    def crash(src, dst, **dir_fds):
        raise KeyboardInterrupt  # what a kill looks like between write and rename

    monkeypatch.setattr(files_mod.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.tree.write(target, b"new")   # the store's writes are files.atomic_write_at
    assert target.read_bytes() == b"old"
    assert os.listdir(store.root) == ["x.json"]  # no temp file left behind


def test_a_rewrite_interrupted_after_the_artifacts_keeps_the_old_result_whole(store, monkeypatch):
    slot = "main/pg19/lazy"
    old = put(store, slot, "a" * 64, nll=[1.0])
    before = sorted(p.name for p in old.parent.iterdir())
    real = confined.Tree.write

    def crash_on_json(self, path, data):
        if path.name == "lazy.json":
            raise KeyboardInterrupt
        real(self, path, data)

    monkeypatch.setattr(confined.Tree, "write", crash_on_json)
    with pytest.raises(KeyboardInterrupt):
        put(store, slot, "b" * 64, nll=[2.0])
    # The old JSON still points at its own NLL, untouched; the new run's NLL was removed.
    cell = store.lookup(slot, "a" * 64, allow_stale=False)
    assert cell is not None and list(read_nll(old.parent / store.read(old)["artifacts"]["nll"])) == [1.0]
    assert sorted(p.name for p in old.parent.iterdir()) == before


def test_scan_reports_corrupt_and_foreign_files_and_skips_them(store):
    good = put(store, "main/pg19/lazy", nll=[1.0])
    bad = store.root / "paper_experiments" / "main" / "pg19"
    (bad / "strict.json").write_text('{"schema_version": 1, "kind": "run", "slot": ')   # truncated
    (bad / "foreign.json").write_text(json.dumps({"schema_version": 99, "kind": "run", "slot": "x/y"}))
    (bad / "other.json").write_text(json.dumps({"hello": "world"}))
    (bad / "list.json").write_text("[1, 2]")
    (bad / "binary.json").write_bytes(b"\xff\xfe\x00")
    moved = put(store, "main/wikitext/lazy")
    nll = store.read(moved)["artifacts"]["nll"]
    os.replace(moved, bad / "misplaced.json")
    os.replace(moved.parent / nll, bad / nll)   # with its artifact: only its place is wrong
    (store.root / "baselines").mkdir()
    (store.root / "baselines" / "pg19_baseline_avg.json").write_text(json.dumps(result("baselines/pg19")
                                                                               | {"schema_version": SCHEMA_VERSION,
                                                                                  "artifacts": {"nll": "gone.f32"},
                                                                                  "artifact_sha256": {"gone.f32": "0" * 64}}))
    report = store.scan()
    assert [e.path for e in report.entries] == [good]
    problems = "\n".join(report.problems)
    assert len(report.problems) == 7
    for what in ("strict.json: corrupt JSON", "foreign.json: foreign JSON", "other.json: foreign JSON",
                 "list.json: foreign JSON", "binary.json: corrupt JSON", "belongs at", "missing artifacts"):
        assert what in problems


def test_scan_ignores_artifacts_temp_files_and_the_stream_index(store):
    put(store, "main/pg19/lazy", cache_len=[1], repeats=[{}, {}])
    (store.root / "paper_experiments" / "main" / "pg19" / ".lazy.json.abc.tmp").write_text("{")
    (store.root / "streams").mkdir()
    (store.root / "streams" / "pg19.json").write_text("{}")
    report = store.scan()
    assert len(report.entries) == 1 and report.problems == []


def test_lookup_reuses_only_an_equal_hash(store):
    slot = "sweeps/pg19/sigma=16"
    put(store, slot, "a" * 64)
    cell = store.lookup(slot, "a" * 64, allow_stale=False)
    assert cell.slot == slot and cell.config_hash == "a" * 64 and not cell.stale
    assert cell.metrics == result(slot)["metrics"]
    assert store.stale == {}
    # Another hash: stale. Never returned silently; with allow_stale returned marked; listed either way.
    assert store.lookup(slot, "b" * 64, allow_stale=False) is None
    assert list(store.stale) == [slot]
    stale = store.lookup(slot, "b" * 64, allow_stale=True)
    assert stale.stale and stale.config_hash == "a" * 64
    # Nothing planned for the slot: a result there cannot be verified, so it is stale too.
    assert store.lookup(slot, None, allow_stale=False) is None
    assert store.lookup("sweeps/pg19/sigma=32", "a" * 64, allow_stale=True) is None


def test_lookup_treats_unreadable_results_as_missing(store):
    path = store.path("main/pg19/lazy")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert store.lookup("main/pg19/lazy", "a" * 64, allow_stale=True) is None
    assert "corrupt JSON" in store.problems["main/pg19/lazy"]


def test_copy_stores_the_same_result_under_another_slot(store):
    source = put(store, "main/pg19/lazy", "c" * 64, nll=[1.0, 2.0], cache_len=[3],
                         repeats=[{"tpot_ms": 1.0}, {"tpot_ms": 3.0}])
    path = store.copy(source, "sweeps/pg19/R=64")
    doc = store.read(path)
    assert doc["slot"] == "sweeps/pg19/R=64" and doc["config_hash"] == "c" * 64
    assert list(read_nll(path.parent / doc["artifacts"]["nll"])) == [1.0, 2.0]
    assert json.loads((path.parent / doc["artifacts"]["repeats"][1]).read_text())["metrics"] == {"tpot_ms": 3.0}
    assert store.lookup("sweeps/pg19/R=64", "c" * 64, allow_stale=False) is not None


def test_atomic_write_leaves_a_world_readable_file(tmp_path):
    target = tmp_path / "r" / "x.json"
    files_mod.atomic_write(target, b"{}")
    assert target.read_bytes() == b"{}" and target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]   # no temp file left behind


def test_the_store_imports_nothing_above_it():
    """The GPU runner writes through the store: it must not drag in the tables, the stages or torch."""
    code = ("import streamkv.store, sys; above = [m for m in ('streamkv.tables', 'streamkv.context', 'streamkv.plans', "
            "'streamkv.stages', 'streamkv.reports', 'streamkv.figures', 'torch') if m in sys.modules]; "
            "assert not above, above")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
