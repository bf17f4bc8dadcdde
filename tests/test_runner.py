"""The runner: one RunSpec on the real engines (tiny random GPT-NeoX), its result JSON and artifacts."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from streamkv import fingerprint
from streamkv.policies import PolicySpec, build_schedule
from streamkv.runner import Runner
from streamkv.spec import MeasureSpec, SpecError
from streamkv.store import Store, read_nll
import bounds

from tiny_models import tiny_gpt_neox
from tiny_runner import tiny  # noqa: F401 (fixture)


def test_runner_streaming_result(tiny):
    store, spec = tiny
    s = spec()
    doc = store.read(Runner(store, progress=False).run("main/long/lazy", s))
    m, schedule = doc["metrics"], build_schedule(s.policy, 48)
    nll = read_nll(store.path("main/long/lazy").parent / doc["artifacts"]["nll"])
    assert len(nll) == m["n_predicted_tokens"] == 47
    # Two float64 sums of the same 47 NLLs in other orders are 2·sum_relative(float64, 47) apart at most;
    # exp turns that into a relative error of the mean NLL times it, plus one ulp (2u) each side.
    mean = sum(nll) / 47
    rel = 2 * bounds.sum_relative(torch.float64, 47) * mean + 4 * bounds.unit_roundoff(torch.float64)
    assert m["perplexity"] == pytest.approx(math.exp(mean), rel=rel)
    assert (m["max_cached_tokens"], m["max_visible_tokens"]) == (16 + 4 - 1, 16 + 4)
    assert m["n_prunes"] == schedule.n_prunes > 0
    # 2 layers × (K, V) × 64 hidden × 4 bytes per cached token
    assert m["kv_cache_bytes"] == 2 * 2 * 64 * 4 * 19
    assert m["tpot_ms"] > 0 and m["tokens_per_s"] == pytest.approx(1000 / m["tpot_ms"])
    assert len(m["repeat_runs"]) == 2 and len(doc["artifacts"]["repeats"]) == 2 and m["tpot_ms_spread"] >= 0
    assert doc["engines"] == {"perplexity": "decode", "timing": "decode"}
    assert doc["fingerprint"]["dtype"] == "torch.float32" and doc["config_hash"] == s.config_hash()
    cache_len = json.loads((store.path("main/long/lazy").parent / doc["artifacts"]["cache_len"]).read_text())
    assert cache_len == schedule.cache_len_after_step


def test_runner_baseline_and_a_perplexity_engine_timed_by_decode(tiny):
    store, spec = tiny
    runner = Runner(store, progress=False)
    base = store.read(runner.run("baselines/long", spec(mode="baseline", engine="recompute",
                                                       policy=PolicySpec(n_sink=4, window=12))))
    assert base["engines"] == {"perplexity": "recompute", "timing": "recompute"}
    assert base["metrics"]["max_cached_tokens"] == 16 and base["metrics"]["n_prunes"] == 0
    s = spec(engine="reference", measure=MeasureSpec(timing_tokens=8, timing_engine="decode"))
    ref = store.read(runner.run("ablations/long/reference", s))
    assert ref["engines"] == {"perplexity": "reference", "timing": "decode"}
    dec = store.read(runner.run("main/long/lazy", spec(measure=MeasureSpec())))
    ref_nll = read_nll(store.path("ablations/long/reference").parent / ref["artifacts"]["nll"])
    dec_nll = read_nll(store.path("main/long/lazy").parent / dec["artifacts"]["nll"])
    # Same schedule, same losses: the reference computes the fp32 model in float64, decode in fp32.
    bound = bounds.forward_nll(torch.float32, tiny_gpt_neox().config, 48, max(ref_nll))
    assert max(abs(a - b) for a, b in zip(ref_nll, dec_nll)) <= bound
    assert ref["metrics"]["n_prunes"] == build_schedule(s.policy, 48).n_prunes   # of the stream, not the timing run


def test_runner_refuses_a_changed_stream_and_a_missing_gpu(tiny):
    store, spec = tiny
    s = spec()
    changed = dataclasses.replace(s, data=dataclasses.replace(s.data, sha256="0" * 64))
    with pytest.raises(SpecError, match="changed since it was planned"):
        Runner(store, progress=False).run("main/long/lazy", changed)
    if not torch.cuda.is_available():
        with pytest.raises(SpecError, match="no CUDA device"):
            Runner(store, progress=False).run("main/long/lazy", dataclasses.replace(s, device="cuda"))
    assert store.scan().entries == []


def test_runner_sets_cpu_threads_and_the_fingerprint_records_them(tmp_path):
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            Runner(Store(tmp_path / "results"), cpu_threads=threads)
            assert torch.get_num_threads() == threads
            assert fingerprint.collect()["torch_threads"] == threads
    finally:
        torch.set_num_threads(before)
