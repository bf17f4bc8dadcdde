"""The one place that knows transformers versions apart (>= 4.56 and 5.x).

- 5.x renamed the forward's `past_key_values=` to `cache=` (and the output's `.past_key_values` to
  `.cache`); 4.56+ already stores a DynamicCache as `cache.layers[i].keys / .values`, which we rely on.
- GPT-NeoX's partial rotary moved from `config.rotary_pct` to `config.rope_parameters`; we read the
  rotary embedding module's own `inv_freq` instead, which both lines compute from their config.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(model_type: type) -> str:
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def _cache_kwarg(model) -> str:
    # Cached per class: inspect.signature costs ~0.5 ms, a visible share of one decode step.
    return _cache_kwarg_of(type(model))


def _forward(model, input_ids, position_ids, cache, attention_mask, **options):
    kwargs = {} if cache is None else {_cache_kwarg(model): cache}
    return model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                 use_cache=cache is not None, **kwargs, **options)


def forward(model, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
            cache: DynamicCache | None = None, attention_mask: torch.Tensor | None = None):
    """One forward of a causal LM; returns (logits, cache). `cache=None` runs without a KV cache."""
    return _forward(model, input_ids, position_ids, cache, attention_mask).logits, cache


def forward_attending(model, input_ids: torch.Tensor, *, position_ids: torch.Tensor, cache: DynamicCache):
    """`forward` that also returns the attention probabilities, (logits, cache, attentions): one
    [batch, heads, queries, keys] tensor per layer, keys in cache slot order, the fed tokens last. Only an
    attention implementation that forms the probabilities returns them: run it under
    engines.attention.swapped_attention(model, engines.attention.PROBABILITIES, ...)."""
    out = _forward(model, input_ids, position_ids, cache, None, output_attentions=True)
    if out.attentions is None or any(a is None for a in out.attentions):
        raise ValueError(f"{type(model).__name__} returned no attention probabilities "
                         f"(attention implementation {model.config._attn_implementation!r})")
    return out.logits, cache, out.attentions


def last_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, vocab] of the last position of each row of input_ids [B, C], without a KV cache and
    without a mask (so SDPA runs causal). The LM head sees the last hidden state of each row only:
    `logits_to_keep=1` (both lines; 4.56+ and 5.x) slices the final hidden states before the head, where
    a plain forward would project all B·C positions onto the vocabulary."""
    return model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits[:, -1]


def new_cache() -> DynamicCache:
    return DynamicCache()


def num_layers(cache: DynamicCache) -> int:
    return len(cache.layers)


def get_kv(cache: DynamicCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    entry = cache.layers[layer]
    return entry.keys, entry.values


def set_kv(cache: DynamicCache, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    entry = cache.layers[layer]
    entry.keys, entry.values = keys, values


def cache_from_kv(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding exactly these per-layer (keys, values), [batch, heads, tokens, head_dim]."""
    cache = DynamicCache()
    for layer, (k, v) in enumerate(kv):
        cache.update(k, v, layer)
    return cache


@dataclass(frozen=True)
class Rotary:
    """Rotary embedding facts needed to re-rotate cached keys: the first `rot_dims` of each head rotate
    (Pythia: 20 of 80), pairing dim i with dim i + rot_dims/2 (the rotate_half layout)."""

    inv_freq: torch.Tensor   # fp32, [rot_dims / 2]
    rot_dims: int
    head_dim: int


def rotary(model) -> Rotary:
    base = model.base_model
    emb = getattr(base, "rotary_emb", None)
    if emb is None:
        raise ValueError(f"{type(model).__name__} has no rotary embedding; only RoPE models are supported")
    rope_type = getattr(emb, "rope_type", "default")
    if rope_type != "default" or float(getattr(emb, "attention_scaling", 1.0)) != 1.0:
        # Scaled RoPE variants change the angle law or magnitudes; a plain delta rotation would be wrong.
        raise ValueError(f"rope_type {rope_type!r} is not supported (default RoPE only)")
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv_freq = emb.inv_freq.detach().float().cpu()
    return Rotary(inv_freq=inv_freq, rot_dims=2 * inv_freq.numel(), head_dim=head_dim)
