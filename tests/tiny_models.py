"""Tiny random models, token streams and dense oracles shared by the engine tests (reference, decode,
parallel, ...).

The weights are drawn with a large init scale (0.3 instead of HF's 0.02) on purpose: with the default
scale attention is nearly uniform and the logits nearly flat, so a wrong key angle would barely move the
loss and the equivalence tests could not fail. Both models run in float64 so engines can be compared to
1e-6 on per-token NLL.
"""
from __future__ import annotations

import functools

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from streamkv import compat
from streamkv.metrics import nll_from_logits

# Tiny matmuls run several times faster on one thread: with more, OpenMP workers spin against each other
# (and against other jobs on a shared 2-core box), which made a 2-layer forward ~50x slower.
torch.set_num_threads(1)

VOCAB = 97
INIT_SCALE = 0.3


def _build(model_cls, config, seed: int, dtype: torch.dtype):
    torch.manual_seed(seed)
    return model_cls(config).to(dtype).eval()


def tiny_gpt_neox(*, seed: int = 0, dtype: torch.dtype = torch.float64, head_dim: int = 32,
                  **overrides) -> GPTNeoXForCausalLM:
    """Pythia-shaped: partial rotary (25% of each head, so 8 of 32 dims), parallel residual, untied head."""
    heads = 2
    knobs = dict(vocab_size=VOCAB, hidden_size=heads * head_dim, num_hidden_layers=2, num_attention_heads=heads,
                 intermediate_size=4 * heads * head_dim, rotary_pct=0.25, max_position_embeddings=512,
                 use_parallel_residual=True, tie_word_embeddings=False, initializer_range=INIT_SCALE)
    knobs.update(overrides)
    return _build(GPTNeoXForCausalLM, GPTNeoXConfig(**knobs), seed, dtype)


def tiny_llama(*, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> LlamaForCausalLM:
    """Full rotary (all 16 dims of a head) with grouped-query attention: 4 query heads share 2 KV heads."""
    knobs = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                 tie_word_embeddings=False, initializer_range=INIT_SCALE)
    knobs.update(overrides)
    return _build(LlamaForCausalLM, LlamaConfig(**knobs), seed, dtype)


MODELS = {"gpt_neox": tiny_gpt_neox, "llama": tiny_llama}


class Float64Rotary(torch.nn.Module):
    """HF's default rotary embedding with its angles and cos/sin computed in float64.

    HF computes rotary angles and cos/sin in fp32 even for a float64 model, so two engines that place the
    same token at different positions (decode at its cache slot, `fast` at its original index, with the
    same distances) differ by fp32 rounding (~1e-6 in per-token NLL at 60 tokens). With this module every
    engine sees float64 rotary and agreement is checked at float64 precision.
    """

    rope_type = "default"
    attention_scaling = 1.0

    def __init__(self, inv_freq: torch.Tensor):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.double(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        angle = position_ids[..., None].double() * self.inv_freq
        angle = torch.cat((angle, angle), dim=-1)
        return angle.cos().to(x.dtype), angle.sin().to(x.dtype)


class Float64RMSNorm(torch.nn.Module):
    """An RMSNorm computed in its input's dtype. HF's LlamaRMSNorm rounds a float64 input through fp32, so
    the same model on a GPU and on a CPU differs by fp32 rounding (rsqrt and the mean are not the same
    instructions on both): the flash-decode test on an H100 missed the CPU reference by 8e-6, gpt_neox
    (LayerNorm, in float64) by ~1e-14."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def with_float64_numerics(model):
    """The model (built here, not a user's) with its rotary embedding and RMSNorms computed in float64."""
    model.base_model.rotary_emb = Float64Rotary(model.base_model.rotary_emb.inv_freq)
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RMSNorm"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Float64RMSNorm(module))
    return model


def token_stream(n_tokens: int, *, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    """A fixed random LongTensor [n_tokens]."""
    return torch.randint(0, vocab, (n_tokens,), generator=torch.Generator().manual_seed(seed))


@functools.cache
def cached_model(name: str, float64_numerics: bool = False):
    """One shared instance per tiny model: building them dominates the engine tests' time otherwise."""
    model = MODELS[name]()
    return with_float64_numerics(model) if float64_numerics else model


cached_stream = functools.cache(token_stream)


def visible_mask(schedule, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Additive attention mask [1, 1, n, n] over the n = T−1 fed tokens: query t sees exactly the cache
    it was fed into (`step.before`), the earlier tokens of its own step (the prefill is causal) and
    itself; everything else gets the dtype's most negative value."""
    n = schedule.n_tokens - 1
    seen = torch.zeros(n, n, dtype=torch.bool)
    for step in schedule:
        before = torch.tensor(step.before.indices(), dtype=torch.long)
        for t in range(step.fed_start, min(step.fed_end, n)):
            seen[t, before] = True
            seen[t, step.fed_start:t + 1] = True
    mask = torch.zeros(n, n, dtype=dtype).masked_fill(~seen, torch.finfo(dtype).min)
    return mask[None, None]


def dense_nll(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token NLL [T−1] (float64) of ONE forward over ids[:-1] at positions 0..T−2 (original
    indices), with an optional 4D additive mask; None is the plain causal forward."""
    n = ids.numel() - 1
    with torch.inference_mode():
        logits, _ = compat.forward(model, ids[None, :n], position_ids=torch.arange(n)[None],
                                   attention_mask=attention_mask)
    return nll_from_logits(logits[0], ids[1:], torch.float64)
