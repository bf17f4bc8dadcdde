"""The bench stage on a tiny GPT-NeoX and synthetic token streams: files, keys, reuse, atomic writes."""
import json
import math
from dataclasses import replace

import pytest
import torch

from streamkv import assets, bench, profiles, store as store_mod
from streamkv.profiles import Dataset
from streamkv.settings import Settings
from streamkv.spec import ModelSpec, RunSpec

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


def test_bench_writes_both_files(tmp_path, profile, monkeypatch):
    written = []
    real_write = store_mod.atomic_write
    monkeypatch.setattr(store_mod, "atomic_write", lambda path, data: (written.append(path), real_write(path, data)))
    s = Settings(results_dir=str(tmp_path), mit_bench_gen_tokens=GEN, warmup_runs=1, repeat_runs=2)
    paths = bench.run_bench(s, profile=profile)

    out = tmp_path / "mit_bench"
    expected = [out / f"{d}_benchmark_{kind}.json" for d in ("demo-long", "demo-short")
                for kind in ("streaming", "recompute")]
    assert paths == expected
    assert set(expected) <= set(written)                                  # every JSON through atomic_write
    assert not [p for p in out.iterdir() if p.name.startswith(".")]       # no temp file left behind

    streaming = json.loads(expected[0].read_text())
    assert streaming["kind"] == "bench" and streaming["slot"] == "mit_bench/demo-long_benchmark_streaming"
    assert set(streaming["metrics"]) == {"strict", "lazy"}
    specs = {label: RunSpec.from_dict(d) for label, d in streaming["spec"].items()}
    assert streaming["config_hashes"] == {label: spec.config_hash() for label, spec in specs.items()}
    assert specs["strict"].policy.compress_every == 1 and specs["lazy"].policy.compress_every == 4
    assert {spec.data.n_tokens for spec in specs.values()} == {CAP + GEN + 1}
    assert {"git_commit", "torch", "dtype"} <= set(streaming["fingerprint"])
    assert len(streaming["artifacts"]["repeats"]) == 2

    recompute = json.loads(expected[1].read_text())
    assert recompute["config_hash"] == RunSpec.from_dict(recompute["spec"]).config_hash()
    assert recompute["spec"]["engine"] == "recompute"

    for m in (streaming["metrics"]["strict"], streaming["metrics"]["lazy"], recompute["metrics"]):
        assert {"ttft_ms", "ttft_ms_spread", "tpot_ms", "tpot_ms_spread", "tokens_per_s", "wall_s", "peak_memory_mb",
                "kv_cache_bytes", "max_cached_tokens", "repeat_runs"} <= set(m)
        assert (m["n_prefill_tokens"], m["n_decoded_tokens"]) == (CAP, GEN)
        assert math.isclose(m["tokens_per_s"], 1000.0 / m["tpot_ms"])
        assert m["tpot_ms"] > 0 and m["ttft_ms"] > 0
        assert m["peak_memory_mb"] is None                                # CPU: no allocator statistics
        assert len(m["repeat_runs"]) == 2
        assert math.isclose(m["tpot_ms"], sum(r["tpot_ms"] for r in m["repeat_runs"]) / 2)
    # Strict prunes every step back to S + W = 16; lazy lets R − 1 = 3 more tokens pile up first.
    assert streaming["metrics"]["strict"]["max_cached_tokens"] == CAP
    assert streaming["metrics"]["lazy"]["max_cached_tokens"] == CAP + 3
    assert recompute["metrics"]["n_prunes"] == 0


def test_bench_reuses_current_files(tmp_path, profile, loads, capsys):
    s = Settings(results_dir=str(tmp_path), mit_bench_gen_tokens=GEN)
    assert len(bench.run_bench(s, profile=profile)) == 4
    assert bench.run_bench(s, profile=profile) == []
    assert len(loads) == 1                      # the second run never loaded the model
    assert capsys.readouterr().err.count(": reused (") == 4
    # Another decode length is another experiment: both files of each dataset are measured again.
    assert len(bench.run_bench(replace(s, mit_bench_gen_tokens=GEN + 1), profile=profile)) == 4
