"""The reference engine's own anchors, independent of the decode engine.

These tests compare keys or losses computed at DIFFERENT absolute positions (a key turned from a to b
against the key HF computes at b; cache slots against original indices). HF computes rotary angles in fp32
even for a float64 model, and position × inv_freq rounded to fp32 moves by up to u32 × position, which
through keys of size ~8 reaches ~6e-6: a tolerance for that depends on the position, the key sizes and
the kernels. So the models here compute their rotary in float64 (tiny_models.Float64Rotary), the
comparison is float64 throughout, and the tolerance is bounds.EXACT; a rotation that is off by one
position misses by O(1) and is asserted to.
"""
from __future__ import annotations

import pytest
import torch

import bounds
from bounds import BROKEN, EXACT
from streamkv import compat, positions
from streamkv.engines import reference
from streamkv.policies import PolicySpec, build_schedule
from tiny_models import MODELS, dense_nll, token_stream, visible_mask, with_float64_numerics


def float64_model(name: str):
    return with_float64_numerics(MODELS[name]())


def keys_at(model, ids: torch.Tensor, first_position: int) -> list[torch.Tensor]:
    """Every layer's keys [1, H, n, D] of `ids` fed as one chunk at positions first_position, ...+n−1."""
    cache = compat.new_cache()
    with torch.inference_mode():
        compat.forward(model, ids[None], cache=cache,
                       position_ids=torch.arange(first_position, first_position + ids.numel())[None])
    return [compat.get_kv(cache, layer)[0] for layer in range(compat.num_layers(cache))]


@pytest.mark.parametrize("a, b", [(3, 40), (50, 7), (0, 63)])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_turned_key_equals_key_computed_there(model_name, a, b):
    """A chunk's hidden states depend only on relative positions, so its keys computed at a, turned by
    b − a, must be the keys HF computes at b, in every layer (partial and full rotary, GQA)."""
    model = float64_model(model_name)
    rot, ids = compat.rotary(model), token_stream(5)
    at_a, at_b = keys_at(model, ids, a), keys_at(model, ids, b)
    for delta, agree in ((b - a, True), (b - a + 1, False)):
        err = max((reference.turn_keys(ka, torch.full((5,), delta), rot) - kb).abs().max().item()
                  for ka, kb in zip(at_a, at_b))
        assert (err <= EXACT) if agree else (err > BROKEN), f"delta {delta}: max abs error {err}"


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_turn_keys_agrees_with_shared_rotate(model_name):
    """Two independent implementations (complex128 pairs here, rotate_half in streamkv.positions)."""
    rot = compat.rotary(MODELS[model_name]())
    keys = torch.randn(2, 3, 7, rot.head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    delta = torch.tensor([-40, -3, -1, 0, 1, 5, 2000])
    # Both round the same float64 angle product; each evaluates cos and sin (≤ 1 ulp: 2·u64) and forms a
    # 2-term combination (two roundings of a product, one of the sum: 3·u64 of each term). The two can
    # differ by the sum of both: 2 × (2 + 3) × u64 per unit of the pair's size, i.e. ≤ 20 · u64 · max|key|.
    bound = 20 * bounds.unit_roundoff(torch.float64) * keys.abs().max().item()
    assert (reference.turn_keys(keys, delta, rot) - positions.rotate(keys, delta, rot)).abs().max() <= bound


@pytest.mark.parametrize("window", [7, 12])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_window_only_cache_mode_equals_masked_dense_forward(model_name, window, monkeypatch):
    """Without sinks every cached key is re-rotated at every step, yet the query−key distances stay the
    true index distances, so cache mode must equal a dense masked forward at original positions. Without
    the re-rotation it must not."""
    model, ids = float64_model(model_name), token_stream(60)
    schedule = build_schedule(PolicySpec(n_sink=0, window=window, compress_every=1), 60)
    dense = dense_nll(model, ids, visible_mask(schedule))

    def error():
        result = reference.evaluate(model, ids, schedule, position_mode="cache", loss_dtype="float64")
        return (result.nll - dense).abs().max().item()

    assert error() <= EXACT
    monkeypatch.setattr(reference, "turn_keys", lambda keys, delta, rot: keys)
    assert error() > BROKEN
