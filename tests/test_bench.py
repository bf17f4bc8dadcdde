"""The bench points on a tiny GPT-NeoX and synthetic token streams: the stage loop, keys, reuse, status."""
import json
import math
from dataclasses import replace

import pytest
import torch

from streamkv import assets, confined, profiles, reports, stages, store as store_mod
from streamkv.profiles import Dataset
from streamkv.settings import Settings
from streamkv.runspec import RunSpec
from streamkv.spec import ModelSpec

from tiny_models import tiny_gpt_neox

CAP, GEN = 16, 8


@pytest.fixture
def loads():
    """Every model load the stage asks for."""
    return []


@pytest.fixture
def profile(monkeypatch, loads):
    """The demo profile shrunk to a 16-token budget, on seeded random streams (no tokenizer needed)."""
    model = tiny_gpt_neox(dtype=torch.float32)

    def load_model(spec, device):
        loads.append(spec)
        return model

    monkeypatch.setattr(assets, "load_model", load_model)
    monkeypatch.setattr(assets, "load_tokenizer", lambda spec: None)
    return replace(profiles.DEMO, model=ModelSpec(name="tiny", revision="0" * 64, dtype="float32"),
                   cap_total=CAP, n_sink=2, lazy_r=4, baseline_sink=2, baseline_window=CAP - 2,
                   long=Dataset("demo-long", "long", assets.synthetic_path(1, 97), 400),
                   short=Dataset("demo-short", "short", assets.synthetic_path(2, 97), 100))


SLOTS = [f"mit_bench/{d}_benchmark_{kind}" for d in ("demo-long", "demo-short")
         for kind in ("streaming_strict", "streaming_lazy", "recompute")]
# The engine comparison on the long stream (its decode strict/lazy points are the slots above).
ENGINE_SLOTS = [f"mit_bench/demo-long_benchmark_{kind}"
                for kind in ("streaming_no_eviction", "fast_no_eviction", "fast_strict", "fast_lazy")]


def run_bench(s: Settings, profile):
    return stages.run_stages(s, ["bench"], profile=profile)


def test_bench_points_go_through_the_stage_loop_and_the_one_writer(tmp_path, profile, monkeypatch):
    written = []
    real_write = confined.Tree.write   # how the store writes every file below the results directory
    monkeypatch.setattr(confined.Tree, "write",
                        lambda self, path, data: (written.append(path), real_write(self, path, data)))
    s = Settings(results_dir=str(tmp_path), mit_bench_gen_tokens=GEN, warmup_runs=1, repeat_runs=2)
    outcome = run_bench(s, profile)
    assert outcome.computed == SLOTS + ENGINE_SLOTS
    store = store_mod.Store(tmp_path)
    paths = [store.path(slot) for slot in SLOTS + ENGINE_SLOTS]
    assert set(paths) <= set(written)                                    # every JSON through Tree.write
    assert not [p for p in (tmp_path / "mit_bench").iterdir() if p.name.startswith(".")]   # no temp file left

    docs = {slot: json.loads(path.read_text()) for slot, path in zip(SLOTS + ENGINE_SLOTS, paths)}
    for slot, doc in docs.items():
        spec = RunSpec.from_dict(doc["spec"])
        assert doc["slot"] == slot and doc["config_hash"] == spec.config_hash()
        assert spec.data.n_tokens == CAP + GEN + 1 and spec.measure.repeat_runs == 2
        assert {"git_commit", "torch", "dtype"} <= set(doc["fingerprint"])
        assert len(doc["artifacts"]["repeats"]) == 2
        m = doc["metrics"]
        assert math.isclose(m["tokens_per_s"], 1000.0 / m["tpot_ms"]) and m["tpot_ms"] > 0 and m["ttft_ms"] > 0
        assert m["peak_memory_mb"] is None                                # CPU: no allocator statistics
        assert math.isclose(m["tpot_ms"], sum(r["tpot_ms"] for r in m["repeat_runs"]) / 2)
        assert m["n_predicted_tokens"] == CAP + GEN                        # the same tokens for every method
    strict, lazy, recompute = (docs[slot] for slot in SLOTS[:3])
    assert (strict["spec"]["engine"], lazy["spec"]["engine"], recompute["spec"]["engine"]) == \
        ("decode", "decode", "recompute")
    # Strict prunes every step back to S + W = 16; lazy lets R − 1 = 3 more tokens pile up first.
    assert strict["metrics"]["max_cached_tokens"] == CAP and lazy["metrics"]["max_cached_tokens"] == CAP + 3
    assert recompute["metrics"]["n_prunes"] == 0
    dense, fast_dense, fast_strict, fast_lazy = (docs[slot] for slot in ENGINE_SLOTS)
    assert [d["engines"]["timing"] for d in (dense, fast_dense, fast_strict, fast_lazy)] == ["decode"] + ["fast"] * 3
    assert dense["metrics"]["n_prunes"] == fast_dense["metrics"]["n_prunes"] == 0
    assert dense["metrics"]["max_cached_tokens"] == CAP + GEN                # no eviction: the cache only grows
    assert fast_strict["spec"]["policy"] == strict["spec"]["policy"]         # the same schedule, another engine
    # `status` lists them once RUN_MIT_BENCH puts them in the paper.
    rows, _ = reports.status(replace(s, run_mit_bench=False), profile=profile)
    assert [slot for slot, _, _ in rows if slot.startswith("mit_bench")] == []
    rows, _ = reports.status(s, profile=profile)
    assert [slot for slot, _, _ in rows if slot.startswith("mit_bench")] == SLOTS + ENGINE_SLOTS


def test_bench_reuses_current_points(tmp_path, profile, loads):
    s = Settings(results_dir=str(tmp_path), mit_bench_gen_tokens=GEN)
    assert len(run_bench(s, profile).computed) == 10
    assert run_bench(s, profile).reused == SLOTS + ENGINE_SLOTS
    assert len(loads) == 1                      # the second run never loaded the model
    # Another decode length is another experiment: every point is measured again.
    assert len(run_bench(replace(s, mit_bench_gen_tokens=GEN + 1), profile).computed) == 10


def test_tables_recognise_results_on_synthetic_streams(tmp_path, profile):
    """The paper-random profile's streams are seeded ids with no file: `status` and `make tex` plan without
    generating them (no torch), so the stages index their DataSpecs like a text stream's; before, every such
    result read as unknown in `status` and as stale in the tables, which then left every cell empty."""
    s = Settings(results_dir=str(tmp_path), mit_bench_gen_tokens=GEN, repeat_runs=1)
    run_bench(s, profile)
    rows, problems = reports.status(s, profile=profile)
    assert {state for slot, state, _ in rows if slot.startswith("mit_bench")} == {"current"} and not problems
    report = reports.write_tables(s, tmp_path / "generated", profile=profile)
    assert report.stale == [] and "[INSERT DATA]" not in (tmp_path / "generated" / "engines.tex").read_text()
