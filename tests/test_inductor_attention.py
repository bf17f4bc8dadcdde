"""The fast engine's Inductor-generated decode attention (engines/inductor_attention.py) against float64 SDPA
and, inside the whole engine, against the float64 reference engine, eager and compiled."""
from __future__ import annotations

import pytest
import torch

from streamkv.engines import fast, inductor_attention
from attention_inputs import SHAPES, inputs
from bounds import BROKEN, EXACT
from test_engines import max_diff
from test_fast import run_fast, run_reference


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_attention_is_sdpa_in_float64(shape):
    heads, kv_heads, slots, dim, hidden = SHAPES[shape]
    q, k, v, mask = inputs(heads, kv_heads, slots, dim, hidden)
    got = inductor_attention.attend(q, k, v, mask, 0.3)
    assert got.shape == q.shape and got.dtype == torch.float64
    assert max_diff(got, fast.DECODE_ATTENTION["sdpa"](q, k, v, mask, 0.3)) <= EXACT


def test_attention_reads_the_mask_and_groups_heads_by_their_kv_head():
    """Hiding one more slot moves the output, and so does pairing a query head with another K/V head: the
    comparison above would see neither mistake if SDPA shared it, so each is checked on its own."""
    heads, kv_heads, slots, dim, hidden = SHAPES["gqa"]
    q, k, v, mask = inputs(heads, kv_heads, slots, dim, hidden)
    k[..., 170, :] = 4 * q[0, 0, 0]   # a visible slot the first query head attends to strongly
    masked = mask.clone()
    masked[:, 170] = float("-inf")
    base = inductor_attention.attend(q, k, v, mask, 0.3)
    assert max_diff(inductor_attention.attend(q, k, v, masked, 0.3), base) > BROKEN
    # Query heads 0..3 read K/V head 0 and 4..7 head 1: swapping the K/V heads must move every output.
    swapped = inductor_attention.attend(q, k.flip(1), v.flip(1), mask, 0.3)
    assert all(max_diff(swapped[:, h], base[:, h]) > BROKEN for h in range(heads))


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", ["strict", "lazy_drop"])
@pytest.mark.parametrize("model_name", ["gpt_neox", "llama"])
def test_fast_engine_with_inductor_attention_matches_reference(model_name, case, compile):
    """The whole engine with this attention in every decode step, eager and as torch.compile generates it
    (on the CPU here; tests/test_fast.py runs the captured CUDA step): equal to the float64 reference."""
    got = run_fast(model_name, case, "cache", graph=False, compile=compile, decode_attention="inductor")
    assert max_diff(got.nll, run_reference(model_name, case, "cache").nll) <= EXACT
