"""Loss, perplexity, KV bytes and the phase timer."""
from __future__ import annotations

import math
import time

import pytest
import torch
from transformers import GPTNeoXConfig, LlamaConfig

from streamkv.metrics import PhaseTimer, kv_cache_bytes, nll_from_logits, peak_memory_mb, perplexity
import bounds


def test_nll_upcasts_half_logits_before_the_log_softmax():
    gen = torch.Generator().manual_seed(0)
    vocab = 50304
    logits = (torch.randn(64, vocab, generator=gen) * 4).half()
    targets = torch.randint(0, vocab, (64,), generator=gen)
    truth = -torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None]).squeeze(-1)
    ours = nll_from_logits(logits, targets)
    in_half = -torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    assert ours.dtype == torch.float32 and ours.shape == (64,)
    # An fp32 log-softmax of 50304 logits with |NLL| ≤ 30: ≈ 7e-5 (observed 7.3e-6 with AVX-512 kernels,
    # 1.6e-5 with AVX2 and default ones). Half precision rounds the output alone by u16·|NLL| ≈ 8e-3, so
    # "upcast happened" is: within the fp32 bound, and the fp16 result at least 10x outside it.
    fp32_bound = bounds.log_softmax(torch.float32, vocab, truth.abs().max().item())
    assert (ours.double() - truth).abs().max() <= fp32_bound
    assert (in_half.double() - truth).abs().max() > 10 * fp32_bound, "fp16 log-softmax should be visibly worse"
    assert nll_from_logits(logits, targets, "float64").dtype == torch.float64


def test_perplexity_sums_in_float64():
    n, nll = 3_000_000, torch.full((3_000_000,), 0.1, dtype=torch.float32)
    exact = n * float(torch.tensor(0.1))
    ppl, total, count = perplexity(nll)
    assert count == n
    # A float64 sum of n terms in any order is within sum_relative(float64, n) ≈ 1e-12. An fp32 result
    # cannot be: the fp32 number nearest the exact sum (300000.0045) is 1.5e-8 from it, relatively.
    rel = bounds.sum_relative(torch.float64, n)
    assert abs(float(nll.sum()) - exact) > rel * exact, "an fp32 sum must miss the float64 bound"
    assert total == pytest.approx(exact, rel=rel)
    assert ppl == pytest.approx(math.exp(float(torch.tensor(0.1))), rel=rel)
    with pytest.raises(ValueError):
        perplexity(torch.empty(0))


def test_kv_cache_bytes():
    pythia = GPTNeoXConfig(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32)
    # 32 layers × (K, V) × 32 heads × 80 dims × 2 bytes × 2048 tokens = 640 MiB
    assert kv_cache_bytes(pythia, 2048, torch.float16) == 32 * 2 * 32 * 80 * 2 * 2048 == 640 * 2**20
    gqa = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    assert kv_cache_bytes(gqa, 10, "float32") == 2 * 2 * 2 * 16 * 4 * 10


def test_phase_timer_on_cpu():
    timer = PhaseTimer("cpu")
    timer.phase("prefill")
    time.sleep(0.02)
    timer.phase("decode")
    time.sleep(0.01)
    ms = timer.stop()
    assert set(ms) == {"prefill", "decode"}
    assert 15 < ms["prefill"] < 500 and 5 < ms["decode"] < 500
    assert timer.peak_mb is None and peak_memory_mb("cpu") is None


def test_phase_names_are_used_once():
    timer = PhaseTimer("cpu")
    timer.phase("decode")
    with pytest.raises(ValueError, match="already timed"):
        timer.phase("decode")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_phase_timer_resets_peak_memory_between_phases():
    timer = PhaseTimer("cuda")
    timer.phase("big")
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    del big
    timer.phase("small")
    small = torch.empty(2**20, dtype=torch.uint8, device="cuda")
    ms = timer.stop()
    del small
    assert ms["big"] >= 0 and timer.peak_mb["big"] >= 256 and timer.peak_mb["small"] < 200
