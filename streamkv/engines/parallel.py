"""Parallel evaluator: the streaming perplexity of a contiguous schedule, chunk by chunk, exactly.

Why this is the same function as token-by-token decoding: under a contiguous schedule, token t (fed with
the cache `step.before`) attends to the sinks [0, n_sink), the recent run [start, t) and itself; tokens
of the prefill see every earlier token. Values are never modified, and a token's hidden states in every
layer depend only on the hidden states of its visible set in the layer below. So all tokens can be
computed at once with a per-query mask, and chunks of queries can run one after another as long as the
keys and values of earlier chunks that later queries still see are kept (the sinks and the recent run of
the next query: `start` never decreases). Memory is O(chunk × (S + window + R + chunk)), never O(T²).

Positions. Every token is fed to the model at the position decoding gives it, P(x) (position_ids), so
each query and each key comes out of the model's own rotary bit for bit as in the decode engine:
- `absolute`: P(x) = x and keys never move; the mask is the whole story.
- `cache` (pos-shift): P(x) = len(before) = n_sink + (x − start), the slot x is fed into (prefill: x).
  Decoding keeps sink i in slot i = P(i), where it was computed. A recent key j sits in slot
  n_sink(t) + (j − start(t)) when query t comes, so decoding has turned it by o(j) − o(t), where
  o(x) = x − P(x) = start(x) − n_sink(x) is x's offset (tokens evicted ahead of it; 0 in the prefill).
  Rotations compose: q·R(o(j) − o(t))·k = (R(o(t))q)·(R(o(j))k). So for recent keys each query and key
  is turned once by its own offset (then their distance is t − j, the true one); sinks are scored with
  the query as computed (distance P(t) − i). Both in ONE softmax, by concatenating along the head dim:
      q'          = [R(o(t)) q_rot, q_pass, q_rot]
      recent key  = [R(o(j)) k_rot, k_pass, 0    ]   -> q_pass·k_pass + q_rot·R(o(j) − o(t))·k_rot
      sink key    = [0,             k_pass, k_rot]   -> q_pass·k_pass + q_rot·k_rot
  with a boolean mask that shows each visible key in exactly one of its two forms, and the scale of the
  real head, 1/sqrt(head_dim). Offsets reach the stream length (~20k), so their angles are computed in
  float64: an fp32 angle there is off by up to ~1e-3 rad. For the same reason we do not feed original
  indices as positions and leave cache mode to the mask: HF builds rotary angles in fp32, so scores at
  positions ~20k differ from decoding's at positions ~2k by far more than rounding (tiny test models at
  60 tokens already miss the reference by 5e-6).

Plumbing: the attention function is registered with transformers' AttentionInterface and swapped in for
the evaluation (engines/attention.py), which restores the model's previous implementation on exit. The
per-chunk plan reaches it through a ContextVar that only `evaluate` sets. Earlier chunks' keys live in the
model's own DynamicCache (at their computed angles), trimmed after every chunk.
"""
from __future__ import annotations

import math
import time
from contextvars import ContextVar
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AttentionInterface

from .. import compat
from ..metrics import PhaseTimer, nll_from_logits
from ..policies.schedule import Schedule
from ..positions import rotate
from ..spec import REROTATIONS
from .attention import swapped_attention
from .base import EngineResult
from .contiguous import StreamPlan, Unsupported, stream_plan

ATTN_IMPLEMENTATION = "streamkv_parallel"
MAX_CHUNK = 2048


def auto_chunk(schedule: Schedule) -> int:
    """Queries per forward when the caller names none. A chunk's queries share one key range of about
    chunk + max_visible columns, of which each query uses up to max_visible: chunk ≈ max_visible keeps
    at least half of the attention work useful, and queries per forward large enough for efficient
    matmuls (Pythia at cap 2048: 2048; the demo at cap 256: ~256)."""
    return max(64, min(MAX_CHUNK, schedule.max_visible))


def _turn(x: torch.Tensor, offset: torch.Tensor, rotary: compat.Rotary) -> torch.Tensor:
    """x's rotary dims [..., n, rot_dims] turned by per-token offsets, angles in float64 (see module doc)."""
    return rotate(x.double(), offset, rotary).to(x.dtype)


@dataclass
class _Chunk:
    """What the attention function needs for one chunk of queries; the same in every layer."""

    mask: torch.Tensor                 # bool [Q, K'] over the key columns `attend` builds
    rotary: compat.Rotary
    q_offset: torch.Tensor | None      # [Q], None when no query or key of the chunk moved (no turning)
    k_offset: torch.Tensor | None      # [K] for the key columns as the model hands them over
    n_sink_cols: int                   # leading key columns (tokens [0, max_sinks)) given a sink form
    calls: int = 0                     # attention layers served: a layer that bypassed us would be wrong

    def attend(self, query, key, value, scaling):
        self.calls += 1
        if self.q_offset is not None:
            query, key, value = self._place(query, key, value)
        if key.shape[1] != query.shape[1]:   # grouped-query attention: each K/V head serves a group
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        head_dim = value.shape[-1]
        if query.device.type == "cpu" and query.shape[-1] != head_dim:
            # The CPU's fused kernel wants one head dim for q, k and v; its math fallback is ~4x slower.
            value = F.pad(value, (0, query.shape[-1] - head_dim))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=self.mask, scale=scaling)
        return out[..., :head_dim].transpose(1, 2).contiguous()

    def _place(self, query, key, value):
        """The concatenated head dims of the module doc, written into one zeroed buffer each for the
        queries and the keys: recent form for every key column, sink form for the first n_sink_cols."""
        rd, s, d = self.rotary.rot_dims, self.n_sink_cols, query.shape[-1]
        width = d + rd if s else d
        width += -width % 8   # the memory-efficient SDPA kernels want multiples of 8 (Pythia: 80 + 20 -> 104)
        q = query.new_zeros(*query.shape[:-1], width)
        k = key.new_zeros(*key.shape[:-2], s + key.shape[-2], width)
        q[..., :rd] = _turn(query[..., :rd], self.q_offset, self.rotary)
        q[..., rd:d] = query[..., rd:]
        k[..., s:, :rd] = _turn(key[..., :rd], self.k_offset, self.rotary)
        k[..., s:, rd:d] = key[..., rd:]
        if s:
            q[..., d:d + rd] = query[..., :rd]
            k[..., :s, rd:d] = key[..., :s, rd:]
            k[..., :s, d:d + rd] = key[..., :s, :rd]
            value = torch.cat((value[..., :s, :], value), dim=-2)
        return q, k, value


_ACTIVE: ContextVar[_Chunk | None] = ContextVar("streamkv_parallel_chunk", default=None)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry: query [B, H, Q, D], key/value [B, Hkv, K, D] after the model's rotary;
    returns ([B, Q, H, D], no weights). HF's mask is None here (no mask function is registered)."""
    chunk = _ACTIVE.get()
    if chunk is None:
        raise RuntimeError(f"attention implementation {ATTN_IMPLEMENTATION!r} only runs inside "
                           "streamkv.engines.parallel.evaluate")
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    return chunk.attend(query, key, value, scaling), None


AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)


def _chunk_plan(plan: StreamPlan, key_idx: torch.Tensor, c0: int, c1: int, rotary: compat.Rotary,
                device) -> _Chunk:
    """Mask and offsets for queries [c0, c1) over the key columns whose original indices are key_idx."""
    t = torch.arange(c0, c1, device=device)[:, None]
    n_sink, start = plan.n_sink[c0:c1, None].to(device), plan.start[c0:c1, None].to(device)
    k = key_idx.to(device)[None, :]
    recent = (k >= start) & (k <= t)
    sink = k < n_sink                      # prefill tokens: n_sink = 0
    q_offset, k_offset = plan.offset[c0:c1], plan.offset[key_idx]
    if not (q_offset.any() or k_offset.any()):
        # Nothing moved (absolute mode, or cache mode before the first prune): every key sits at its
        # decoding angle, sinks included, so one plain masked attention is exact.
        return _Chunk(mask=recent | sink, rotary=rotary, q_offset=None, k_offset=None, n_sink_cols=0)
    s = min(plan.max_sinks, key_idx.numel())
    assert bool((key_idx[:s] == torch.arange(s)).all()), "sink tokens lead the key columns"
    return _Chunk(mask=torch.cat((sink[:, :s], recent), dim=1), rotary=rotary, q_offset=q_offset.to(device),
                  k_offset=k_offset.to(device), n_sink_cols=s)


def _drop_unseen(cache, key_idx: torch.Tensor, max_sinks: int, next_start: int) -> torch.Tensor:
    """Keep only the cached keys a later query can see: the sinks and [next_start, ...). key_idx is
    sorted, so that is a leading and a trailing run of columns. Returns the kept columns' indices."""
    head = int((key_idx < max_sinks).sum())
    tail = max(head, int(torch.searchsorted(key_idx, next_start)))
    if tail == head:
        return key_idx
    for layer in range(compat.num_layers(cache)):
        keys, values = compat.get_kv(cache, layer)
        compat.set_kv(cache, layer, torch.cat((keys[..., :head, :], keys[..., tail:, :]), dim=-2),
                      torch.cat((values[..., :head, :], values[..., tail:, :]), dim=-2))
    return torch.cat((key_idx[:head], key_idx[tail:]))


@torch.inference_mode()
def evaluate(model, ids: torch.Tensor, schedule: Schedule, *, position_mode: str = "cache",
             rerotation: str = "exact", loss_dtype: torch.dtype | str = "float32", progress: bool = False,
             chunk_size: int | None = None) -> EngineResult:
    """Per-token NLL of `schedule` on `ids` [T], equal to the decode/reference engines' (module doc).

    chunk_size: queries per forward (default `auto_chunk`). No per-token timings exist here
    (ttft_ms = tpot_ms = None); wall_s is the whole evaluation."""
    if rerotation not in REROTATIONS:
        raise ValueError(f"unknown rerotation {rerotation!r}; choose one of {REROTATIONS}")
    if position_mode == "cache" and rerotation != "exact":
        raise Unsupported(f"rerotation={rerotation!r} replays the rounding drift of each prune, "
                                  "which only the decode engine reproduces")
    plan = stream_plan(schedule, position_mode, "parallel")
    chunk_size = auto_chunk(schedule) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = next(model.parameters()).device
    # inv_freq on the device: a host tensor would be copied (and the host would wait) in every layer.
    rotary = compat.rotary(model)
    rotary = replace(rotary, inv_freq=rotary.inv_freq.to(device))
    ids, position = ids.to(device), plan.position.to(device)
    n_fed = schedule.n_tokens - 1
    cache = compat.new_cache()
    key_idx = torch.empty(0, dtype=torch.long)     # original index of each cached key column
    nll = []
    timer = PhaseTimer(device)
    timer.phase("parallel")
    began = time.perf_counter()
    bar = tqdm(total=n_fed, disable=not progress, desc="parallel", unit="tok")
    with swapped_attention(model, ATTN_IMPLEMENTATION, "parallel"):
        for c0 in range(0, n_fed, chunk_size):
            c1 = min(c0 + chunk_size, n_fed)
            key_idx = torch.cat((key_idx, torch.arange(c0, c1)))
            chunk = _chunk_plan(plan, key_idx, c0, c1, rotary, device)
            token = _ACTIVE.set(chunk)
            try:
                logits, cache = compat.forward(model, ids[None, c0:c1], position_ids=position[None, c0:c1],
                                               cache=cache)
            finally:
                _ACTIVE.reset(token)
            if chunk.calls != compat.num_layers(cache):
                raise RuntimeError(f"{chunk.calls} of {compat.num_layers(cache)} attention layers used the "
                                   "parallel attention function; the others would ignore the schedule")
            # Losses per chunk: T × vocab logits never exist at once.
            nll.append(nll_from_logits(logits[0], ids[c0 + 1:c1 + 1], loss_dtype))
            del logits
            if c1 < n_fed:
                key_idx = _drop_unseen(cache, key_idx, plan.max_sinks, int(plan.start[c1]))
            bar.update(c1 - c0)
    bar.close()
    timer.stop()
    return EngineResult(nll=torch.cat(nll).cpu(), cache_len_after_step=schedule.cache_len_after_step,
                        ttft_ms=None, tpot_ms=None, wall_s=time.perf_counter() - began,
                        peak_memory_mb=timer.peak_mb, engine="parallel")
