"""The fast engine (ring buffer, sinks-only re-rotation, CUDA graph) against the float64 reference engine.

The tiny models here compute their rotary and RMSNorms in float64 (tiny_models.with_float64_numerics): the
fast engine places tokens at their original indices, the reference at their cache slots, with equal
distances, so with HF's fp32 rotary the two would differ by fp32 angle rounding (~1e-6) and the comparison
could not resolve a real bug from it; HF's RMSNorm rounds through fp32 too, which on a GPU against the CPU
reference is 8e-6. In float64 they agree to ~1e-14 (asserted at bounds.EXACT); the mutations below miss by
more than bounds.BROKEN.
GPU tests (CUDA graph path) run on a CUDA machine: `python -m pytest tests/test_fast.py -k cuda`.
"""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamkv.engines import fast, reference
from streamkv.engines.contiguous import Unsupported, stream_plan
from streamkv.policies import PolicySpec, build_schedule
import bounds
from bounds import BROKEN, EXACT
from test_engines import CASES, MODES, N_TOKENS, max_diff
from tiny_models import MODELS, cached_model, cached_stream

CONTIGUOUS = sorted(c for c in CASES if CASES[c].refresh_budget == 0)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph path: needs a GPU")


def model(name: str):
    return cached_model(name, float64_numerics=True)


@functools.cache
def run_reference(model_name: str, case: str, mode: str):
    schedule = build_schedule(CASES[case], N_TOKENS)
    return reference.evaluate(model(model_name), cached_stream(N_TOKENS), schedule, position_mode=mode,
                              loss_dtype="float64")


def run_fast(model_name: str, case: str, mode: str, **kwargs):
    schedule = build_schedule(CASES[case], N_TOKENS)
    return fast.evaluate(model(model_name), cached_stream(N_TOKENS), schedule, position_mode=mode,
                         loss_dtype="float64", **kwargs)


def run_fast_on(device: str, model_name: str, case: str, **kwargs):
    """run_fast in cache mode with the (cached, shared) model on `device`, moved back to the CPU after."""
    m = model(model_name)
    try:
        m.to(device)
        return run_fast(model_name, case, "cache", **kwargs)
    finally:
        m.to("cpu")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CONTIGUOUS)
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_fast_matches_reference(model_name, case, mode):
    ref, got = run_reference(model_name, case, mode), run_fast(model_name, case, mode)
    assert got.nll.shape == ref.nll.shape and got.nll.dtype == torch.float64
    assert got.cache_len_after_step == ref.cache_len_after_step
    assert max_diff(got.nll, ref.nll) <= EXACT
    assert got.engine == "fast" and got.tpot_ms is not None and got.ttft_ms is not None


def test_unknown_decode_attention_is_refused():
    with pytest.raises(ValueError, match="decode_attention"):
        run_fast("gpt_neox", "strict", "cache", decode_attention="flashy")


def test_flash_decode_attention_on_cpu_is_refused_up_front(monkeypatch):
    """The Triton attention compiles for GPUs: on CPU tensors (outside Triton's interpreter, which
    tests/test_flash_decode.py uses) one line says so before any work, whether or not Triton is installed."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="flash.*'sdpa'"):
        run_fast("gpt_neox", "strict", "cache", decode_attention="flash")


def test_the_triton_gemv_is_the_default_on_cuda_only():
    """On CUDA the step's linears run engines/gemv.py; on CPU F.linear (Triton needs its interpreter there)."""
    assert fast.default_linear(torch.device("cuda")) == "triton"
    assert fast.default_linear(torch.device("cpu")) == "torch"


def test_unknown_linear_and_the_triton_gemv_on_cpu_are_refused_up_front(monkeypatch):
    with pytest.raises(ValueError, match="unknown linear 'cutlass'"):
        run_fast("gpt_neox", "strict", "cache", linear="cutlass")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for linear in sorted(set(fast.LINEARS) - {"torch"}):
        with pytest.raises(RuntimeError, match=f"linear='{linear}'.*'torch'"):
            run_fast("gpt_neox", "strict", "cache", linear=linear)


@pytest.mark.parametrize("mode", MODES)
def test_sink_offset_off_by_one_fails(monkeypatch, mode):
    """Sinks turned one position too far: the very mutation the module doc's derivation rules out."""
    real = fast.sink_offset
    monkeypatch.setattr(fast, "sink_offset", lambda plan, position_mode: real(plan, position_mode) + 1)
    got, ref = run_fast("gpt_neox", "strict", mode), run_reference("gpt_neox", "strict", mode)
    assert max_diff(got.nll, ref.nll) > BROKEN


def test_ring_one_slot_short_fails(monkeypatch):
    """A ring one slot shorter than ring_layout's overwrites a token some query still sees."""
    real = fast.ring_layout
    monkeypatch.setattr(fast, "ring_layout", lambda plan: (real(plan, 1)[0], real(plan, 1)[1] - 1))
    got, ref = run_fast("llama", "lazy_r4", "cache"), run_reference("llama", "lazy_r4", "cache")
    assert max_diff(got.nll, ref.nll) > BROKEN


@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c].refresh_budget))
def test_refresh_schedules_are_refused(case):
    with pytest.raises(Unsupported, match="decode engine"):
        run_fast("gpt_neox", case, "cache")


def test_composed_fp16_is_refused():
    with pytest.raises(Unsupported, match="decode engine"):
        run_fast("gpt_neox", "strict", "cache", rerotation="composed_fp16")


policies = st.builds(
    lambda s, w, r, sigma, delta: PolicySpec(n_sink=s, window=w, compress_every=r, cache_slack=sigma, max_drop=delta),
    st.integers(0, 4), st.integers(1, 12), st.integers(0, 9), st.integers(0, 10), st.integers(0, 6))


@settings(max_examples=150, deadline=None)
@given(policies, st.integers(2, 80), st.sampled_from(MODES), st.sampled_from([1, 8, None]))
def test_ring_shows_each_query_exactly_its_schedule(policy, n_tokens, mode, multiple):
    """Pure slot arithmetic, replayed on the host: after token t takes its slot, the slots the mask opens
    for query t hold exactly the tokens the schedule lets it see; unrounded, the buffer is no larger than
    the most keys any query sees."""
    schedule = build_schedule(policy, n_tokens)
    plan = stream_plan(schedule, mode, "fast")
    sinks, ring = fast.ring_layout(plan, multiple)
    if multiple == 1:
        assert sinks + ring <= max(schedule.max_visible, 1)
    else:
        assert (sinks + ring) % (multiple or fast.CAPACITY_MULTIPLE) == 0
    n_fed = n_tokens - 1
    slot = fast.slot_of(torch.arange(n_fed), sinks, ring).tolist()
    held = [-1] * (sinks + ring)
    for t in range(n_fed):
        held[slot[t]] = t
        start, n_sink = int(plan.start[t]), int(plan.n_sink[t])
        opened = {held[s] for s in range(sinks + ring) if start <= held[s] <= t or s < n_sink}
        assert opened == set(range(n_sink)) | set(range(start, t + 1))


def test_rotary_tables_are_float64_angles():
    """At index 20000 an fp32 angle is off by ~1e-3 rad; the tables must match float64 to fp32 rounding."""
    rotary = fast.compat.rotary(MODELS["gpt_neox"]())
    cos, _ = fast.rotary_tables(rotary, 20001, torch.float32, "cpu")
    f = rotary.inv_freq[1]   # 0.1 in fp32: 20000 · f is not exact in fp32 (1 would be)
    exact = torch.cos(torch.tensor(20000.0, dtype=torch.float64) * f.double())
    # A float64 cos (≤ 1 ulp, 2·u64) rounded once to fp32 (u32·|cos|).
    table_bound = bounds.unit_roundoff(torch.float32) * abs(exact) + 2 * bounds.unit_roundoff(torch.float64)
    assert abs(cos[20000, 1].double() - exact) <= table_bound
    # What HF's fp32 angle gives: 2000 rad rounded to fp32 moves by up to u32·2000 = 1.2e-4 rad (2.8e-5 here).
    fp32 = torch.cos(torch.tensor(20000.0) * f)
    assert abs(fp32.double() - exact) > 100 * table_bound


@cuda
@pytest.mark.parametrize("attention", sorted(fast.DECODE_ATTENTION))
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled-graph"])
@pytest.mark.parametrize("case", ["strict", "lazy_drop", "full"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_cuda_graph_matches_reference(model_name, case, compile, attention):
    """The captured step on the GPU, float64 model, against the CPU reference, with each decode attention."""
    got = run_fast_on("cuda", model_name, case, graph=True, compile=compile, decode_attention=attention)
    assert max_diff(got.nll, run_reference(model_name, case, "cache").nll) <= EXACT


@cuda
@pytest.mark.parametrize("linear", sorted(fast.LINEARS))
@pytest.mark.parametrize("case", ["strict", "lazy_drop"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_cuda_graph_with_each_linear_matches_reference(model_name, case, linear):
    """The compiled, captured step with its one-row linears on each of fast.LINEARS (the Triton GEMV, the
    CUDA default, entered through a TorchFunctionMode inside the compiled step; cuBLAS through F.linear),
    float64 model, against the CPU reference."""
    got = run_fast_on("cuda", model_name, case, graph=True, compile=True, linear=linear)
    assert max_diff(got.nll, run_reference(model_name, case, "cache").nll) <= EXACT


@cuda
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_cuda_graph_with_every_triton_kernel_matches_reference(model_name):
    """The fused GEMV and the one-kernel flash attention in one compiled, captured step (the combination
    the suite's `decode_cuts` times), float64 model, against the CPU reference."""
    got = run_fast_on("cuda", model_name, "lazy_drop", graph=True, compile=True, linear="triton_fused",
                      decode_attention="flash")
    assert max_diff(got.nll, run_reference(model_name, "lazy_drop", "cache").nll) <= EXACT


@cuda
def test_cuda_graph_equals_eager_in_fp16():
    torch.manual_seed(0)
    m = MODELS["llama"]().to("cuda", torch.float16)
    schedule = build_schedule(CASES["lazy_r4"], N_TOKENS)
    ids = cached_stream(N_TOKENS)
    eager = fast.evaluate(m, ids, schedule, graph=False)
    graphed = fast.evaluate(m, ids, schedule, graph=True, compile=False)
    assert torch.equal(eager.nll, graphed.nll)
    compiled = fast.evaluate(m, ids, schedule, graph=True, compile=True)   # fused kernels round differently
    # Fusion moves where fp16 intermediates are rounded, not what is computed: about 10 roundings a layer
    # (norm, Q, K, V, rotary, scores, output, MLP in and out, residual) and the head, each u16 of the
    # logits' size; the NLL moves by at most twice the largest logit change.
    with torch.inference_mode():
        logit_size = m(ids[None].to("cuda")).logits.abs().max().item()
    n_roundings = 10 * m.config.num_hidden_layers + 2
    assert max_diff(compiled.nll, eager.nll) <= 2 * bounds.rounded_intermediates(torch.float16, n_roundings, logit_size)
