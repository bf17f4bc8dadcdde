"""The parallel engine against the reference engine: same per-token NLL, both position modes.

Tiny random float64 models (tests/tiny_models.py), caps of 12-17 so dozens of prunes happen in a stream
of 61 tokens (60 fed), evaluated with chunks that divide the stream (12), do not (7) and cover it whole
(4096). The engines agree to ~1e-14; the tolerance is bounds.EXACT (1e-6), and the mutation tests show that a
wrong sink distance or a wrong recent distance moves the NLL by more than bounds.BROKEN (1e-3).
"""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamkv import engines
from streamkv.engines import contiguous, parallel, reference
from streamkv.engines.contiguous import Unsupported
from streamkv.policies import PolicySpec, build_schedule
import bounds
from bounds import BROKEN, EXACT
from tiny_models import MODELS, VOCAB, cached_model, cached_stream, dense_nll, token_stream

N_TOKENS = 61
CHUNKS = (7, 12, 4096)

CASES = {
    "strict": PolicySpec(n_sink=2, window=12, compress_every=1),
    "strict_s4": PolicySpec(n_sink=4, window=10, compress_every=1),
    "lazy_r4": PolicySpec(n_sink=2, window=10, compress_every=4),
    "lazy_slack": PolicySpec(n_sink=2, window=8, compress_every=3, cache_slack=6),
    "lazy_drop": PolicySpec(n_sink=2, window=8, compress_every=3, cache_slack=5, max_drop=2),
    "lazy_drop_r5": PolicySpec(n_sink=3, window=8, compress_every=5, cache_slack=6, max_drop=3),
    "overlap": PolicySpec(n_sink=2, window=8, overlap=3, compress_every=2),
    "window_only": PolicySpec(n_sink=0, window=12, compress_every=1),
    "full": PolicySpec(n_sink=2, window=12, compress_every=0),
}
MODES = ("cache", "absolute")


model = cached_model


def stream() -> torch.Tensor:
    return cached_stream(N_TOKENS)


@functools.cache
def reference_nll(model_name: str, case: str, mode: str) -> torch.Tensor:
    schedule = build_schedule(CASES[case], N_TOKENS)
    return reference.evaluate(model(model_name), stream(), schedule, position_mode=mode, loss_dtype="float64").nll


def run_parallel(model_name: str, case: str, mode: str, chunk_size: int = 7):
    schedule = build_schedule(CASES[case], N_TOKENS)
    return parallel.evaluate(model(model_name), stream(), schedule, position_mode=mode, loss_dtype="float64",
                             chunk_size=chunk_size)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_parallel_matches_reference(model_name, case, mode, chunk_size):
    schedule = build_schedule(CASES[case], N_TOKENS)
    assert case == "full" or schedule.n_prunes >= 5, "the case must exercise eviction"
    result = run_parallel(model_name, case, mode, chunk_size)
    assert result.nll.shape == (N_TOKENS - 1,) and result.nll.dtype == torch.float64
    assert result.cache_len_after_step == schedule.cache_len_after_step
    assert max_diff(result.nll, reference_nll(model_name, case, mode)) <= EXACT


def _slot_shifted(by: int):
    """A slot off by `by` for tokens fed after a prune. (Shifting every token, prefill included, would
    be harmless: rotary scores depend on position differences only.)"""
    return lambda n_sink, start, t: torch.where(start > 0, n_sink + (t - start) + by, t)


@pytest.mark.parametrize("broken_slot", [
    pytest.param(_slot_shifted(1), id="off-by-one"),
    pytest.param(_slot_shifted(-1), id="off-by-minus-one"),
    pytest.param(lambda n_sink, start, t: t, id="original-position"),
])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_wrong_sink_distance_is_caught(model_name, broken_slot, monkeypatch):
    """Queries and recent keys are turned back to their true distance whatever their slot, so a wrong
    slot is exactly a wrong sink distance P(t) − i."""
    monkeypatch.setattr(contiguous, "cache_slot", broken_slot)
    broken = run_parallel(model_name, "strict", "cache").nll
    assert max_diff(broken, reference_nll(model_name, "strict", "cache")) > BROKEN


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_wrong_recent_distance_is_caught(model_name, monkeypatch):
    """Without turning queries and recent keys by their offsets, recent keys sit at slot distances."""
    monkeypatch.setattr(parallel, "_turn", lambda x, offset, rotary: x)
    broken = run_parallel(model_name, "strict", "cache").nll
    assert max_diff(broken, reference_nll(model_name, "strict", "cache")) > BROKEN


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_position_modes_differ(model_name):
    """Guards the fixtures: if the tiny models ignored positions, the tests above could not fail."""
    assert max_diff(run_parallel(model_name, "strict", "cache").nll,
                    run_parallel(model_name, "strict", "absolute").nll) > BROKEN


@st.composite
def contiguous_knobs(draw):
    return PolicySpec(n_sink=draw(st.integers(0, 4)), window=draw(st.integers(1, 10)),
                      overlap=draw(st.integers(0, 2)), compress_every=draw(st.integers(0, 8)),
                      cache_slack=draw(st.integers(0, 9)), max_drop=draw(st.integers(0, 4)))


@settings(max_examples=40, derandomize=True, deadline=None)
@given(policy=contiguous_knobs(), n_tokens=st.integers(2, 48), mode=st.sampled_from(MODES),
       model_name=st.sampled_from(sorted(MODELS)), chunk_size=st.integers(1, 20))
def test_generated_knob_sets(policy, n_tokens, mode, model_name, chunk_size):
    schedule = build_schedule(policy, n_tokens)
    ids = stream()[:n_tokens]
    ref = reference.evaluate(model(model_name), ids, schedule, position_mode=mode, loss_dtype="float64")
    par = parallel.evaluate(model(model_name), ids, schedule, position_mode=mode, loss_dtype="float64",
                            chunk_size=chunk_size)
    assert par.cache_len_after_step == ref.cache_len_after_step
    assert max_diff(par.nll, ref.nll) <= EXACT


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_float32_model_stays_close_to_the_float64_reference(model_name):
    """The production path (fp32 here, fp16 on GPU) turns rotary dims in float64 and casts back."""
    fp32 = MODELS[model_name](dtype=torch.float32)
    result = parallel.evaluate(fp32, stream(), build_schedule(CASES["lazy_drop_r5"], N_TOKENS), chunk_size=12)
    exact = reference_nll(model_name, "lazy_drop_r5", "cache")
    # An fp32 forward against the float64 one: ≈ 1e-4 at |NLL| ≤ 13 (observed ≤ 8.1e-6 on AVX-512, AVX2 and
    # default kernels); a wrong schedule misses by more than BROKEN.
    bound = bounds.forward_nll(torch.float32, fp32.config, N_TOKENS, exact.abs().max().item())
    assert max_diff(result.nll, exact) <= bound < BROKEN


def test_stream_shorter_than_cap_is_the_causal_forward():
    ids = stream()[:10]
    result = parallel.evaluate(model("llama"), ids, build_schedule(CASES["strict"], 10), loss_dtype="float64",
                               chunk_size=4)
    assert max_diff(result.nll, dense_nll(model("llama"), ids)) <= EXACT


def test_kept_keys_do_not_grow_with_the_stream(monkeypatch):
    """Memory: a chunk's queries see at most chunk + (S + W + O + R) keys (+ S sink forms), whatever T."""
    seen = []
    attend = parallel._Chunk.attend

    def spy(self, query, key, value, scaling):
        seen.append(key.shape[-2])
        return attend(self, query, key, value, scaling)

    monkeypatch.setattr(parallel._Chunk, "attend", spy)
    policy, chunk, n_tokens = CASES["lazy_r4"], 8, 400
    parallel.evaluate(model("gpt_neox"), token_stream(n_tokens), build_schedule(policy, n_tokens),
                      chunk_size=chunk)
    assert max(seen) <= chunk + policy.soft + policy.compress_every
    assert len(seen) == model("gpt_neox").config.num_hidden_layers * -(-(n_tokens - 1) // chunk)


@pytest.mark.parametrize("policy", [
    PolicySpec(n_sink=2, window=8, refresh_budget=3, refresh_policy="uniform", compress_every=2),
    PolicySpec(n_sink=1, window=8, refresh_budget=3, refresh_policy="middle", compress_every=3),
])
def test_refresh_schedules_are_refused(policy):
    with pytest.raises(Unsupported, match="decode engine"):
        parallel.evaluate(model("gpt_neox"), stream(), build_schedule(policy, N_TOKENS))
    assert issubclass(Unsupported, NotImplementedError)


def test_composed_fp16_ablation_is_refused():
    with pytest.raises(Unsupported, match="decode engine"):
        parallel.evaluate(model("gpt_neox"), stream(), build_schedule(CASES["strict"], N_TOKENS),
                          rerotation="composed_fp16")


def test_result_and_attention_implementation_restored():
    m = model("gpt_neox")
    before = m.config._attn_implementation
    schedule = build_schedule(CASES["lazy_r4"], N_TOKENS)
    result = engines.get("parallel").function(m, stream(), schedule)
    assert m.config._attn_implementation == before != parallel.ATTN_IMPLEMENTATION
    assert result.engine == "parallel" and result.nll.dtype == torch.float32 and result.nll.device.type == "cpu"
    assert result.ttft_ms is None and result.tpot_ms is None and result.wall_s > 0
    assert result.cache_len_after_step == schedule.cache_len_after_step
    exact = reference_nll("gpt_neox", "lazy_r4", "cache")   # float64 model, fp32 log-softmax (≈ 6e-6)
    assert max_diff(result.nll, exact) <= bounds.log_softmax(torch.float32, VOCAB, exact.abs().max().item())
    # Outside `evaluate` the registered implementation refuses to run rather than attend without a plan.
    with pytest.raises(RuntimeError, match="only runs inside"):
        parallel._attention(None, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), None)


def test_attention_implementation_restored_after_a_failure():
    m = model("llama")
    before = m.config._attn_implementation
    with pytest.raises(RuntimeError):   # ids shorter than the schedule's stream: shapes stop matching
        parallel.evaluate(m, stream()[:30], build_schedule(CASES["strict"], N_TOKENS), chunk_size=16)
    assert m.config._attn_implementation == before


def test_model_that_cannot_switch_attention_is_refused(monkeypatch):
    """transformers only warns when a model cannot take a custom attention function; running on would
    silently ignore the schedule."""
    m = model("gpt_neox")
    monkeypatch.setattr(m, "set_attn_implementation", lambda name: None)
    with pytest.raises(Unsupported, match="decode engine"):
        parallel.evaluate(m, stream(), build_schedule(CASES["strict"], N_TOKENS))


def test_registry():
    assert engines.get("parallel").function is parallel.evaluate
