"""Production decode engine: the plain HF forward with a DynamicCache, evicting per the schedule.

Step 0 prefills `prefill_len` tokens in one forward (their losses count); every later step feeds one
token. After each step that prunes, every layer's K/V is cut to `step.keep` with index_select.

Positions (DESIGN.md, "Positions"):
- `absolute`: a token's position is its index; cached keys keep their angle, pruning only selects.
- `cache`: a token's position is the cache length when it is fed, so it is computed at the angle of the
  slot it lands in. A prune moves kept keys to lower slots, and slot k must carry position k.
  - `exact` (`_ExactShift`): beside the working cache we keep, for the kept tokens, the rotary dims of
    their keys AS COMPUTED and the position each was computed at. At a prune, every kept key is set to
    rotate(original, new_slot − computed_position): one rotation from the original angle, in fp32
    (float64 for float64 keys), never a rotation of an already rotated key. This is the same placement
    the reference engine builds, so the two agree to float64 rounding (~1e-12), not just "closely".
    Why not a cheaper scheme such as leaving the recent keys at their original positions and moving only
    the sinks and the query: scores only depend on position differences, but HF computes rotary angles
    in fp32 (error ~ position × 6e-8 rad), so shifting every position by the stream offset (20k tokens:
    ~1e-3 rad) changes the numbers and breaks agreement with the slot-positioned reference. The price
    of exactness here is small: only the rotary dims are stored and rotated (Pythia: 20 of 80, a quarter
    of the key cache), all layers in one batched rotation per prune, none at all between lazy prunes.
  - `composed_fp16` (`_ComposedShift`): the seed's behaviour, an fp16 rotation of the working keys by
    (new_slot − old_slot) at every prune, compounding rounding. Recorded ablation only.

Score policies (streamkv/policies/scored.py: H2O, TOVA) decide each keep set from the attention of the
forwards since the previous prune: the forwards then run with engines.attention.PROBABILITIES, which
returns the probabilities, and hand them to the schedule's `scores()`; the keep slots come back as a
device tensor and are applied exactly like a schedule's.

No per-token host sync: keep-index tensors are built once per distinct keep tuple and cached on the
device; position ids and slot numbers are slices of one device arange; NLL goes into a preallocated
device tensor; the cache length is read from tensor shapes (host metadata). One sync at the end
(tests/test_engines.py checks the loop under CUDA's sync debug mode).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
from tqdm import tqdm

from .. import compat
from ..metrics import PhaseTimer, as_dtype, nll_from_logits
from ..policies.schedule import Schedule
from ..positions import compose_fp16, rotate
from .attention import PROBABILITIES, swapped_attention
from .base import EngineResult

PROGRESS_EVERY = 64   # tokens between progress-bar updates: per-token updates cost more than a tiny forward


def _select(cache, layer: int, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = compat.get_kv(cache, layer)
    return k.index_select(2, keep), v.index_select(2, keep)


class _NoShift:
    """`absolute` mode: keys keep the angle of their original index; a prune only selects."""

    def prune(self, cache, keep: torch.Tensor) -> None:
        for layer in range(compat.num_layers(cache)):
            compat.set_kv(cache, layer, *_select(cache, layer, keep))


class _ComposedShift:
    """The seed's in-place fp16 re-rotation by (new_slot − old_slot) at every prune (ablation)."""

    def __init__(self, rot: compat.Rotary, slots: torch.Tensor):
        self.rot, self.slots = rot, slots

    def prune(self, cache, keep: torch.Tensor) -> None:
        delta = self.slots[:keep.numel()] - keep           # slot keep[j] moves to slot j
        for layer in range(compat.num_layers(cache)):
            k, v = _select(cache, layer, keep)
            compat.set_kv(cache, layer, compose_fp16(k, delta, self.rot), v)


class _ExactShift:
    """One fp32 rotation per prune from each kept key's computed angle (see the module doc)."""

    def __init__(self, rot: compat.Rotary, slots: torch.Tensor):
        self.rot, self.slots = rot, slots
        self.original: torch.Tensor | None = None   # [layers, B, kv_heads, n, rot_dims], as computed
        self.computed_at = slots[:0]                # [n] position each original key was computed at

    def prune(self, cache, keep: torch.Tensor) -> None:
        n_layers, rd = compat.num_layers(cache), self.rot.rot_dims
        n_old = self.computed_at.numel()            # cache length right after the previous prune
        length = compat.get_kv(cache, 0)[0].shape[2]
        # Tokens fed since the previous prune sit untouched in slots [n_old, length): exactly as computed,
        # and (cache mode: position = cache length when fed) computed at the position equal to that slot.
        fresh = torch.stack([compat.get_kv(cache, layer)[0][:, :, n_old:, :rd] for layer in range(n_layers)])
        original = fresh if self.original is None else torch.cat((self.original, fresh), dim=3)
        computed_at = torch.cat((self.computed_at, self.slots[n_old:length]))
        self.original, self.computed_at = original.index_select(3, keep), computed_at.index_select(0, keep)
        # Kept token j lands in slot j, which must carry position j.
        turned = rotate(self.original, self.slots[:keep.numel()] - self.computed_at, self.rot)
        for layer in range(n_layers):
            k, v = _select(cache, layer, keep)
            k[..., :rd] = turned[layer]
            compat.set_kv(cache, layer, k, v)


class _KeepIndex:
    """Device index tensors for keep tuples, built on first use (one host->device copy per distinct keep:
    strict and lazy schedules repeat a handful of tuples, so the loop itself never copies)."""

    def __init__(self, device):
        self.device, self._cached = device, {}

    def __call__(self, keep: tuple[int, ...]) -> torch.Tensor:
        index = self._cached.get(keep)
        if index is None:
            index = self._cached[keep] = torch.tensor(keep, dtype=torch.long, device=self.device)
        return index


def _shifter(position_mode: str, rerotation: str, model, slots: torch.Tensor):
    if position_mode == "absolute":
        return _NoShift()
    if position_mode != "cache":
        raise ValueError(f"unknown position_mode {position_mode!r}")
    shifters = {"exact": _ExactShift, "composed_fp16": _ComposedShift}
    if rerotation not in shifters:
        raise ValueError(f"unknown rerotation {rerotation!r}; choose one of {sorted(shifters)}")
    # inv_freq moved to the device once: positions.rotate would otherwise copy it host->device, a sync,
    # at every prune.
    rot = compat.rotary(model)
    return shifters[rerotation](dataclasses.replace(rot, inv_freq=rot.inv_freq.to(slots.device)), slots)


@torch.inference_mode()
def evaluate(model, ids: torch.Tensor, schedule: Schedule, *, position_mode: str = "cache",
             rerotation: str = "exact", loss_dtype: torch.dtype | str = "float32",
             progress: bool = False, label: str = "decode") -> EngineResult:
    """Per-token NLL and timings of `schedule` on `ids` [T], decoding with the model's own forward.
    `label` names the progress bar (engines/periods.py runs this loop under its own name).
    `schedule`: a policy's Schedule, or its ScoredSchedule (not imported here: a score policy's code counts
    in its own points' identity, never in this engine's, so adding or editing one leaves every schedule
    point current)."""
    device = next(model.parameters()).device
    n_tokens = schedule.n_tokens
    ids = ids.to(device)
    # Positions and slot numbers never exceed the number of tokens fed, so one arange serves both.
    slots = torch.arange(n_tokens, device=device)
    shifter = _shifter(position_mode, rerotation, model, slots)
    keep_index = _KeepIndex(device)
    nll = torch.empty(n_tokens - 1, dtype=as_dtype(loss_dtype), device=device)
    cache = compat.new_cache()
    cache_len: list[int] = []
    length = 0
    timer = PhaseTimer(device)
    began = time.perf_counter()
    bar = tqdm(total=n_tokens - 1, disable=not progress, desc=label, unit="tok")
    scores = schedule.scores()   # None: every keep set is in the schedule
    with contextlib.nullcontext() if scores is None else swapped_attention(model, PROBABILITIES, "decode"):
        for step in schedule:
            if step.index <= 1:   # step 0 is the prefill, every later step one decoded token
                timer.phase("decode" if step.index else "prefill")
            a, b = step.fed_start, step.fed_end
            first = length if position_mode == "cache" else a   # cache mode: a new token's position = cache length
            positions = slots[None, first:first + b - a]
            if scores is None:
                logits, cache = compat.forward(model, ids[None, a:b], position_ids=positions, cache=cache)
                keep = None if step.keep is None else keep_index(step.keep)
            else:
                logits, cache, attentions = compat.forward_attending(model, ids[None, a:b], position_ids=positions,
                                                                     cache=cache)
                scores.attend(attentions)
                keep = scores.prune(step)
            scored = min(b, n_tokens - 1) - a                   # the last token of the stream predicts nothing
            nll[a:a + scored] = nll_from_logits(logits[0, :scored], ids[a + 1:a + 1 + scored], loss_dtype)
            if keep is not None:
                shifter.prune(cache, keep)
            length = compat.get_kv(cache, 0)[0].shape[2]
            cache_len.append(length)
            if progress and (b - bar.n >= PROGRESS_EVERY or b >= n_tokens - 1):
                bar.update(min(b, n_tokens - 1) - bar.n)
    bar.close()
    ms = timer.stop()
    n_decode = len(schedule.steps) - 1
    return EngineResult(nll=nll.cpu(), cache_len_after_step=cache_len, ttft_ms=ms["prefill"],
                        tpot_ms=ms["decode"] / n_decode if n_decode else None,
                        wall_s=time.perf_counter() - began, peak_memory_mb=timer.peak_mb, engine="decode")
