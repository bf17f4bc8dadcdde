"""Reference engine: obviously correct, slow, float64. The yardstick every other engine is tested against.

It follows the schedule literally, one token per forward, even inside the prefill step (prefill token j
sees tokens 0..j−1, as a causal prefill does). Every token's K/V is stored exactly as the model computed
it, with the position it was computed at, and never modified. Before EVERY forward the visible cache is
rebuilt from that store:
- `cache` mode: visible token k sits in slot k and must look as if computed at position k, so its stored
  key is rotated once, from its computed position to k; the new token gets position = cache length.
- `absolute` mode: stored keys are used as they are; the new token's position is its index.
After each step the visible list is cut to `step.keep` (slots of the grown cache), and checked against the
schedule's own view of the cache (`step.after`), so the slot arithmetic of the policy is cross-checked.
Under a score policy (H2O, TOVA) the forwards run with engines.attention.PROBABILITIES and every token's
attention over the cache it saw goes to the schedule's `scores()`, which returns the keep slots at each
prune; the cache length is then checked against the schedule's.

The rotation here is deliberately NOT streamkv.positions.rotate: it multiplies each rotary pair
(i, i + rot_dims/2) as one complex128 number by e^{iΔθ_i}, so a bug in the shared rotate cannot hide
in both this engine and the decode engine. (The tests also check this rotation against HF itself.)
"""
from __future__ import annotations

import contextlib
import copy
import time

import torch
from tqdm import tqdm

from .. import compat
from ..metrics import PhaseTimer, as_dtype, nll_from_logits
from ..policies.schedule import Schedule
from .attention import PROBABILITIES, swapped_attention
from .base import EngineResult


def turn_keys(keys: torch.Tensor, delta: torch.Tensor, rot: compat.Rotary) -> torch.Tensor:
    """Keys [..., n, head_dim] (float64) as if computed `delta` [n] positions later.

    HF's rotary (rotate_half layout) maps the pair (x_i, x_{i+h}), h = rot_dims/2, to
    (x_i cos − x_{i+h} sin, x_{i+h} cos + x_i sin) with angle position·θ_i: that is complex multiplication
    of x_i + i·x_{i+h} by e^{i·position·θ_i}, so moving by delta multiplies by e^{i·delta·θ_i}.
    Dims past rot_dims (GPT-NeoX partial rotary) carry no position.
    """
    half = rot.rot_dims // 2
    pair = torch.complex(keys[..., :half], keys[..., half:rot.rot_dims])
    angle = (delta.to(keys.device, torch.float64)[:, None]
             * rot.inv_freq.to(keys.device, torch.float64)[None, :])
    pair = pair * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((pair.real, pair.imag, keys[..., rot.rot_dims:]), dim=-1)


class _Store:
    """Every fed token's per-layer K/V as computed, and the position it was computed at."""

    def __init__(self, n_layers: int):
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]   # [layer][token] -> [1, H, 1, D]
        self.values: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.position: list[int] = []

    def add(self, cache, position: int) -> None:
        """Take the newest entry of every layer of `cache` (the token just fed)."""
        for layer in range(len(self.keys)):
            k, v = compat.get_kv(cache, layer)
            self.keys[layer].append(k[:, :, -1:].clone())
            self.values[layer].append(v[:, :, -1:].clone())
        self.position.append(position)

    def cache_of(self, visible: list[int], position_mode: str, rot: compat.Rotary):
        """A fresh DynamicCache holding `visible` (original indices, slot order), placed per the mode."""
        if not visible:
            return compat.new_cache()
        # Slot k holds visible[k]; in cache mode its key must carry position k.
        delta = torch.tensor([slot - self.position[t] for slot, t in enumerate(visible)])
        kv = []
        for layer in range(len(self.keys)):
            k = torch.cat([self.keys[layer][t] for t in visible], dim=2)
            v = torch.cat([self.values[layer][t] for t in visible], dim=2)
            kv.append((turn_keys(k, delta, rot) if position_mode == "cache" else k, v))
        return compat.cache_from_kv(kv)


def _float64(model):
    return model if next(model.parameters()).dtype == torch.float64 else copy.deepcopy(model).to(torch.float64)


@torch.inference_mode()
def evaluate(model, ids: torch.Tensor, schedule: Schedule, *, position_mode: str = "cache",
             rerotation: str = "exact", loss_dtype: torch.dtype | str = "float32",
             progress: bool = False) -> EngineResult:
    """Per-token NLL of `schedule` on `ids` [T], computed in float64 as described in the module doc.
    `schedule`: a policy's Schedule, or its ScoredSchedule (not imported here: a score policy's code counts
    in its own points' identity, never in this engine's, so adding or editing one leaves every schedule
    point current)."""
    if position_mode not in ("cache", "absolute"):
        raise ValueError(f"unknown position_mode {position_mode!r}")
    if rerotation != "exact":
        raise ValueError("the reference engine realises exact re-rotation only; "
                         f"rerotation={rerotation!r} is a decode-engine ablation")
    model = _float64(model)
    device = next(model.parameters()).device
    rot = compat.rotary(model)
    n_tokens = schedule.n_tokens
    ids = ids.to(device)
    store = _Store(model.config.num_hidden_layers)
    nll = torch.empty(n_tokens - 1, dtype=as_dtype(loss_dtype))
    visible: list[int] = []
    cache_len = []
    timer = PhaseTimer(device)
    began = time.perf_counter()
    bar = tqdm(total=n_tokens - 1, disable=not progress, desc="reference", unit="tok")
    scores = schedule.scores()   # None: every keep set is in the schedule
    with contextlib.nullcontext() if scores is None else swapped_attention(model, PROBABILITIES, "reference"):
        for step in schedule:
            if step.index <= 1:   # step 0 is the prefill, every later step one decoded token
                timer.phase("decode" if step.index else "prefill")
            assert scores is not None or visible == step.before.indices(), "the reference's cache drifted"
            for t in range(step.fed_start, step.fed_end):
                position = len(visible) if position_mode == "cache" else t
                cache = store.cache_of(visible, position_mode, rot)
                position_ids = torch.tensor([[position]], device=device)
                if scores is None:
                    logits, cache = compat.forward(model, ids[None, t:t + 1], cache=cache, position_ids=position_ids)
                else:
                    logits, cache, attentions = compat.forward_attending(model, ids[None, t:t + 1], cache=cache,
                                                                         position_ids=position_ids)
                    scores.attend(attentions)
                store.add(cache, position)
                if t + 1 < n_tokens:
                    nll[t] = nll_from_logits(logits[0, -1:], ids[t + 1:t + 2], loss_dtype)[0]
                visible.append(t)
                bar.update(1)
            keep = step.keep if scores is None else scores.prune(step)
            if keep is not None:
                visible = [visible[slot] for slot in keep]   # a tuple, or a tensor of a score policy's slots
            if scores is None:
                assert visible == step.after.indices(), "step.keep and step.after disagree"
            else:
                assert len(visible) == step.length_after, "the reference's cache drifted from the schedule"
            cache_len.append(len(visible))
    bar.close()
    ms = timer.stop()
    n_decode = len(schedule.steps) - 1
    return EngineResult(nll=nll, cache_len_after_step=cache_len, ttft_ms=ms["prefill"],
                        tpot_ms=ms["decode"] / n_decode if n_decode else None,
                        wall_s=time.perf_counter() - began, peak_memory_mb=timer.peak_mb, engine="reference")
