"""The reference engine's own anchors, independent of the decode engine.

HF computes rotary angles in fp32 even for a float64 model (position × inv_freq rounded to fp32, error
~position × 6e-8 rad), so comparisons that move a key or a query to a DIFFERENT absolute position than HF
used agree only to ~1e-6 relative; the tolerances below allow 10-50x that, while a rotation that is off
by one position misses by O(1) and is asserted to.
"""
from __future__ import annotations

import pytest
import torch

from streamkv import compat, positions
from streamkv.engines import reference
from streamkv.policies import build_schedule
from streamkv.spec import PolicySpec
from tiny_models import MODELS, dense_nll, token_stream, visible_mask

FP32_ANGLE_TOL = 5e-5


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
    model = MODELS[model_name]()
    rot, ids = compat.rotary(model), token_stream(5)
    at_a, at_b = keys_at(model, ids, a), keys_at(model, ids, b)
    for delta, agree in ((b - a, True), (b - a + 1, False)):
        err = max((reference.turn_keys(ka, torch.full((5,), delta), rot) - kb).abs().max().item()
                  for ka, kb in zip(at_a, at_b))
        assert (err <= FP32_ANGLE_TOL) is agree, f"delta {delta}: max abs error {err}"


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_turn_keys_agrees_with_shared_rotate(model_name):
    """Two independent implementations (complex128 pairs here, rotate_half in streamkv.positions)."""
    rot = compat.rotary(MODELS[model_name]())
    keys = torch.randn(2, 3, 7, rot.head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    delta = torch.tensor([-40, -3, -1, 0, 1, 5, 2000])
    assert (reference.turn_keys(keys, delta, rot) - positions.rotate(keys, delta, rot)).abs().max() < 1e-12


@pytest.mark.parametrize("window", [7, 12])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_window_only_cache_mode_equals_masked_dense_forward(model_name, window, monkeypatch):
    """Without sinks every cached key is re-rotated at every step, yet the query−key distances stay the
    true index distances, so cache mode must equal a dense masked forward at original positions (up to
    HF's fp32 angles at shifted positions). Without the re-rotation it must not."""
    model, ids = MODELS[model_name](), token_stream(60)
    schedule = build_schedule(PolicySpec(n_sink=0, window=window, compress_every=1), 60)
    dense = dense_nll(model, ids, visible_mask(schedule))

    def error():
        result = reference.evaluate(model, ids, schedule, position_mode="cache", loss_dtype="float64")
        return (result.nll - dense).abs().max().item()

    assert error() <= FP32_ANGLE_TOL
    monkeypatch.setattr(reference, "turn_keys", lambda keys, delta, rot: keys)
    assert error() > 1e-3
