"""Running a model with one of our attention functions, through transformers' AttentionInterface.

An engine registers its function once under its own name and wraps its forwards in `swapped_attention`.
transformers 4.56+ and 5.x both dispatch through `config._attn_implementation` and both skip mask creation
for an implementation without a registered mask function, so no T×T mask is ever built. Nothing of the
model is patched: the previous implementation is restored on exit.

`UNMASKED_SDPA` is HF's own SDPA attention function under a name of ours: with no mask function registered
for it, transformers hands it no mask, so for a forward over whole rows without a cache (the recompute
baseline's windows) it runs SDPA with is_causal, the path of the flash / cuDNN kernels. Eager, HF's "sdpa"
already skips the mask for such a batch, so the call is the same, bit for bit; under torch.compile, HF
builds the causal mask and passes it (it skips it only outside tracing), and cuDNN's masked kernel took
7.9 ms of a 25.8 ms compiled window on an H100, its causal one 2.4 ms eager
(docs/bench/h100_profile_recompute_compiled.json, h100_profile_recompute.json).

`PROBABILITIES` is the one shared here: the attention the score policies read (decode and reference
engines). It is HF's eager attention, which returns its probabilities, except that the softmax runs in the
model's dtype (float32 at least): HF's eager takes it in float32 even for a float64 model, a 1e-7 relative
error that the float64 comparison of two engines at 1e-6 would resolve. Like every function registered
here it gets no mask from transformers, so it applies the causal one itself: the q queries are the last q
of the L keys (a prefill chunk over an empty cache, or one decoded token over the cache).
"""
from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .contiguous import Unsupported

PROBABILITIES = "streamkv_probabilities"
UNMASKED_SDPA = "streamkv_unmasked_sdpa"
AttentionInterface.register(UNMASKED_SDPA, sdpa_attention_forward)


def _with_probabilities(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """AttentionInterface entry: query [B, H, Q, D], key/value [B, Hkv, K, D]; returns ([B, Q, H, D],
    probabilities [B, H, Q, K]). Query head h reads key/value head h // (H / Hkv), as HF's repeat_kv."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:   # a copy of the whole cache per layer otherwise, at every decoded token
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:   # a transformers line that builds one anyway: the same causal mask
        logits = logits + attention_mask
    n_queries, n_keys = logits.shape[-2:]
    if n_queries > 1:   # query i is key n_keys − n_queries + i and sees the keys up to itself
        future = torch.ones(n_queries, n_keys, dtype=torch.bool, device=logits.device).triu(n_keys - n_queries + 1)
        logits = logits.masked_fill(future, float("-inf"))
    probabilities = logits.softmax(-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    return torch.matmul(probabilities, value).transpose(1, 2).contiguous(), probabilities


AttentionInterface.register(PROBABILITIES, _with_probabilities)


@contextlib.contextmanager
def swapped_attention(model, implementation: str, engine: str, instead: str = "use the decode engine"):
    previous = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        if model.config._attn_implementation != implementation:
            # transformers only warns for models whose attention does not go through AttentionInterface.
            raise Unsupported(f"{type(model).__name__} cannot switch to a custom attention function, which "
                              f"the {engine} engine needs: {instead}")
        yield
    finally:
        model.set_attn_implementation(previous)
