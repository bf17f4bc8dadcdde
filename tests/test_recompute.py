"""The batched recompute baseline: B windows per forward give the NLL of one window per forward, the LM
head scores each window's last position, attention takes SDPA's causal path, parts concatenate to the
whole run bit for bit, and the batch size is part of the config hash except at its neutral value 1.

Tiny float64 models (tests/tiny_models.py): a 40-token stream at cap 12 has 27 windows after the prefill,
which none of the batch sizes 2, 5 and 7 divides.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from streamkv import compat, shards
from streamkv.engines.attention import UNMASKED_SDPA, swapped_attention
from streamkv.engines.contiguous import Unsupported
from streamkv.engines.recompute import evaluate_recompute
from streamkv.metrics import nll_from_logits
from streamkv.policies import PolicySpec
from streamkv.runspec import RunSpec
from streamkv.spec import DataSpec, ModelSpec, SpecError
import bounds
from bounds import BROKEN, EXACT
from tiny_models import MODELS, cached_model, cached_stream

CAP, N_TOKENS = 12, 40
BATCHES = (1, 2, 5, 7, 64)   # 64: every window in one forward


def stream() -> torch.Tensor:
    return cached_stream(N_TOKENS)


@functools.cache
def run(model_name: str, batch: int):
    return evaluate_recompute(cached_model(model_name), stream(), CAP, loss_dtype="float64", batch=batch)


def direct_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """The oracle: for every token, a plain HF forward of the (up to) CAP tokens before it, its last logit."""
    out = []
    with torch.inference_mode():
        for t in range(1, ids.numel()):
            window = ids[max(0, t - CAP):t]
            out.append(nll_from_logits(model(window[None]).logits[0, -1:], ids[t:t + 1], torch.float64))
    return torch.cat(out)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_batched_equals_one_window_per_forward(model_name, batch):
    batched, single = run(model_name, batch), run(model_name, 1)
    assert batched.nll.shape == (N_TOKENS - 1,) and batched.nll.dtype == torch.float64
    assert max_diff(batched.nll, single.nll) <= EXACT
    assert max_diff(batched.nll, direct_nll(cached_model(model_name), stream())) <= EXACT
    # TPOT is per predicted token: the decode phase over the 27 windows, whatever the batch.
    timed_ms = batched.ttft_ms + batched.tpot_ms * (N_TOKENS - 1 - CAP)
    assert 0.5 * batched.wall_s * 1e3 < timed_ms <= batched.wall_s * 1e3


@pytest.mark.parametrize("parts", [
    pytest.param(None, id="shards.ranges"),
    pytest.param([(0, 14), (14, 23), (23, 24), (24, 39)], id="cuts-inside-batches"),
])
@pytest.mark.parametrize("batch", [1, 5])
def test_parts_concatenate_to_the_batched_whole_bit_for_bit(batch, parts):
    model = cached_model("gpt_neox")
    parts = parts or shards.ranges(N_TOKENS, CAP, 3, batch)
    pieces = [(r, evaluate_recompute(model, stream(), CAP, loss_dtype="float64", part=r, batch=batch))
              for r in parts]
    merged = shards.merge(pieces, prefill=CAP)
    assert torch.equal(merged.nll, run("gpt_neox", batch).nll)


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_shard_cuts_fall_on_batch_boundaries(batch):
    ranges = shards.ranges(200, 16, 5, batch)
    assert ranges[0][0] == 0 and ranges[-1][1] == 199 and len(ranges) > 1
    assert all((start - 16) % batch == 0 for start, _ in ranges[1:])


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_last_logits_are_the_last_positions_of_a_full_forward(model_name):
    model, ids = cached_model(model_name), stream().unfold(0, CAP, 1)[:5]
    with torch.inference_mode():
        full = model(ids).logits
        last = compat.last_logits(model, ids)
    assert last.shape == (5, full.shape[-1])
    assert max_diff(last, full[:, -1]) <= EXACT
    assert max_diff(full[:, -2], full[:, -1]) > BROKEN   # a wrong position would be visible


def test_a_head_on_the_wrong_position_is_caught(monkeypatch):
    """Guards the tests above: scoring each window's second-to-last position must fail them."""
    monkeypatch.setattr(compat, "last_logits", lambda model, ids: model(input_ids=ids).logits[:, -2])
    broken = evaluate_recompute(cached_model("llama"), stream(), CAP, loss_dtype="float64", batch=5)
    assert max_diff(broken.nll, run("llama", 5).nll) > BROKEN


def recorded_sdpa_calls(monkeypatch) -> list:
    """(batch, queries, no mask, is_causal) of every SDPA call from now on, eager or traced by torch.compile."""
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((query.shape[0], query.shape[2], attn_mask is None, is_causal))
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_windows_take_sdpas_causal_path_without_a_mask(monkeypatch, model_name):
    """No padding, so no mask: SDPA gets is_causal=True, which the flash / cuDNN kernels serve on CUDA (an
    explicit mask forces slower kernels), on transformers 5.x and 4.57 alike: 4.57's own "sdpa" builds an
    explicit causal mask for these forwards, which attention.UNMASKED_SDPA avoids."""
    calls = recorded_sdpa_calls(monkeypatch)
    model = cached_model(model_name)
    evaluate_recompute(model, stream(), CAP, loss_dtype="float64", batch=7)
    layers = model.config.num_hidden_layers
    # The prefill, then 27 windows in batches of 7, 7, 7, 6: every call causal, none with a mask.
    assert [c[:2] for c in calls[::layers]] == [(1, CAP), (7, CAP), (7, CAP), (7, CAP), (6, CAP)]
    assert len(calls) == 5 * layers
    assert all(no_mask and causal for _, _, no_mask, causal in calls)


@pytest.mark.parametrize("implementation", ["sdpa", UNMASKED_SDPA])
def test_a_compiled_window_forward_gets_no_mask_only_under_unmasked_sdpa(monkeypatch, implementation):
    """Traced by torch.compile, HF's own "sdpa" builds the causal mask and passes it (on an H100, cuDNN's
    masked kernel took 3.3x its causal one: docs/bench/h100_profile_recompute_compiled.json); the same HF
    function under UNMASKED_SDPA gets none and runs causal, with the eager logits."""
    model = cached_model("gpt_neox")
    windows = stream()[:3 * CAP].reshape(3, CAP)
    calls = recorded_sdpa_calls(monkeypatch)
    torch._dynamo.reset()
    with torch.inference_mode(), swapped_attention(model, implementation, "recompute"):
        eager = compat.last_logits(model, windows)
        calls.clear()
        compiled = torch.compile(lambda: compat.last_logits(model, windows), backend="eager", dynamic=False)()
    assert len(calls) == model.config.num_hidden_layers
    assert all(no_mask and causal for _, _, no_mask, causal in calls) == (implementation == UNMASKED_SDPA)
    assert torch.equal(compiled, eager)


def test_unmasked_sdpa_is_hfs_sdpa_bit_for_bit():
    """Eager, on both tiny models: the recompute forwards under UNMASKED_SDPA equal HF's "sdpa" exactly."""
    for model_name in sorted(MODELS):
        model = cached_model(model_name)
        windows = stream()[:3 * CAP].reshape(3, CAP)
        with torch.inference_mode():
            plain = compat.last_logits(model, windows)
            with swapped_attention(model, UNMASKED_SDPA, "recompute"):
                unmasked = compat.last_logits(model, windows)
        assert torch.equal(unmasked, plain)


def test_a_model_that_cannot_switch_attention_is_refused(monkeypatch):
    model = cached_model("gpt_neox")
    monkeypatch.setattr(model, "set_attn_implementation", lambda implementation: None)
    with pytest.raises(Unsupported, match="recompute engine needs.*AttentionInterface"):
        evaluate_recompute(model, stream(), CAP, loss_dtype="float64")


BASELINE = RunSpec(model=ModelSpec("m", "0" * 40), data=DataSpec("d", "d.json", "f" * 64, 100), mode="baseline",
                   policy=PolicySpec(n_sink=4, window=12), engine="recompute")


def test_the_batch_is_hashed_except_at_one():
    batched = dataclasses.replace(BASELINE, recompute_batch=16)
    assert "recompute_batch" not in BASELINE.hashed() and batched.hashed()["recompute_batch"] == 16
    assert batched.config_hash() != BASELINE.config_hash()
    # A result written before the field existed reads back as batch 1, with its hash unchanged.
    old = BASELINE.to_dict()
    del old["recompute_batch"]
    assert RunSpec.from_dict(old) == BASELINE and RunSpec.from_dict(batched.to_dict()) == batched


def test_the_batch_belongs_to_the_baseline():
    with pytest.raises(SpecError, match="recompute_batch"):
        dataclasses.replace(BASELINE, recompute_batch=0)
    streaming = dict(model=BASELINE.model, data=BASELINE.data, mode="streaming", policy=BASELINE.policy)
    with pytest.raises(SpecError, match="recompute_batch"):
        RunSpec(**streaming, recompute_batch=4)
    assert RunSpec(**streaming).recompute_batch == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_parts_are_bit_identical_and_batches_within_rounding():
    """On the GPU in fp16: a part's windows come out of the whole run's very forwards, bit for bit; another
    batch size changes the GEMM shapes, so the NLL may move by fp16 rounding, never more."""
    m = MODELS["llama"]().to("cuda", torch.float16)
    ids = stream()
    whole = evaluate_recompute(m, ids, CAP, batch=5)
    pieces = [(r, evaluate_recompute(m, ids, CAP, part=r, batch=5)) for r in [(0, 14), (14, 23), (23, 39)]]
    assert torch.equal(shards.merge(pieces, prefill=CAP).nll, whole.nll)
    assert set(whole.peak_memory_mb) == {"prefill", "decode"}
    single = evaluate_recompute(m, ids, CAP, batch=1)
    with torch.inference_mode():
        logit_size = m(ids[None, :CAP].to("cuda")).logits.abs().max().item()
    # As tests/test_fast.py bounds fused against unfused kernels: about 10 roundings a layer and the head,
    # each u16 of the logits' size; the NLL moves by at most twice the largest logit change.
    n_roundings = 10 * m.config.num_hidden_layers + 2
    assert max_diff(whole.nll, single.nll) <= 2 * bounds.rounded_intermediates(torch.float16, n_roundings, logit_size)
