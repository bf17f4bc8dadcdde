"""Eviction policies as pure integer schedules (no torch).

A policy only decides, after every forward, whether to prune the KV cache and which token indices stay.
Every engine (reference, decode, parallel) consumes the same `Schedule`, so this module alone defines the
semantics, and each engine is tested against the reference engine on the same schedule.

The decision rule reproduces the seed's code (DESIGN.md):
  soft = S + W + O + B, hard = soft + σ; the policy is consulted once after every forward, the prefill
  forward included, and a step counter counts these calls. With L tokens cached:
  - R = 0: never prune. Otherwise prune only when L − soft ≥ R (lazy R lets attention see up to
    soft + R − 1 cached keys plus the new one; R = 1 is StreamingLLM Start+Recent).
  - Cooldown: if δ > 0 and σ > 0 and step < cooldown_until and L ≤ hard, do not prune.
  - δ = 0: prune to soft. δ > 0: safe = hard − max(0, R − 1); prune to soft if safe < soft, else to
    min(max(L − δ, soft), safe). Every prune sets cooldown_until = step + max(1, R).
    (So δ changes nothing unless σ ≥ R: with σ ≤ R − 1, safe ≤ soft and every prune lands on soft, and
    the cooldown never blocks, since a prune needs L ≥ soft + R > hard. DESIGN.md's "σ ≥ 63" for R = 64 is loose.)
  A prune to `target` keeps the first min(S, L) tokens (sinks), up to B refresh tokens chosen from the
  evicted middle, and the most recent tokens to fill the rest. Values are never modified here: positions
  and rotations are the engines' business.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

from .spec import PolicySpec, SpecError


@dataclass(frozen=True)
class CacheView:
    """The original token indices held in the cache, in slot order: sinks, refresh tokens, recent run.

    Slots: sink i -> i; refresh[k] -> n_sink + k; recent token j -> n_sink + len(refresh) + (j − start).
    """

    n_sink: int                  # tokens [0, n_sink)
    refresh: tuple[int, ...]     # sorted, all in [n_sink, start)
    start: int                   # recent run is [start, end)
    end: int

    def __len__(self) -> int:
        return self.n_sink + len(self.refresh) + (self.end - self.start)

    def indices(self) -> list[int]:
        return list(range(self.n_sink)) + list(self.refresh) + list(range(self.start, self.end))

    def token_at(self, slot: int) -> int:
        """The original token index held in `slot` (0 <= slot < len(self)), without listing the view."""
        if not 0 <= slot < len(self):
            raise IndexError(f"slot {slot} outside a cache of {len(self)}")
        if slot < self.n_sink:
            return slot
        if slot < self.n_sink + len(self.refresh):
            return self.refresh[slot - self.n_sink]
        return self.start + (slot - self.n_sink - len(self.refresh))

    @property
    def contiguous(self) -> bool:
        """Sinks plus one recent run: the shape the parallel engine can evaluate with a mask."""
        return not self.refresh


@dataclass(frozen=True)
class Step:
    """One forward: tokens [fed_start, fed_end) enter a cache that held `before`; then the policy runs.

    `keep` lists the slots (into the cache after the forward, len(before) + fed tokens long) that survive
    the prune, or is None when the policy does not prune; `after` is the cache view after the prune.
    """

    index: int
    fed_start: int
    fed_end: int
    before: CacheView
    keep: tuple[int, ...] | None
    after: CacheView


class Pruner:
    """The seed's stateful decision rule: `target(L)` is consulted once per forward."""

    def __init__(self, policy: PolicySpec):
        self.p = policy
        self.step = 0
        self.cooldown_until = 0

    def target(self, length: int) -> int | None:
        p, step = self.p, self.step
        self.step += 1
        R, sigma, delta = p.compress_every, p.cache_slack, p.max_drop
        if R == 0 or length - p.soft < R:
            return None
        if delta > 0 and sigma > 0 and step < self.cooldown_until and length <= p.hard:
            return None
        if delta == 0:
            target = p.soft
        else:
            safe = p.hard - max(0, R - 1)
            target = p.soft if safe < p.soft else min(max(length - delta, p.soft), safe)
        self.cooldown_until = step + max(1, R)
        return target


def _choose_refresh(middle: range, budget: int, how: str) -> tuple[int, ...]:
    """Refresh tokens from the evicted middle: evenly spaced (uniform) or a centred run (middle)."""
    if budget == 0:
        return ()
    if how == "uniform":
        # Centre of each of `budget` equal parts, so the picks span the whole middle.
        return tuple(middle[(2 * k + 1) * len(middle) // (2 * budget)] for k in range(budget))
    lo = (len(middle) - budget) // 2
    return tuple(middle[lo:lo + budget])


@lru_cache(maxsize=1024)
def _prune_slots(length: int, target: int, n_sink: int, refresh_budget: int,
                 refresh_policy: str) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(sinks kept, refresh slots, all kept slots) of a prune from `length` to `target` slots.

    A pure function of slot positions, memoised so that the thousands of identical prunes of a schedule
    (every step of a strict one) share one `keep` tuple instead of each holding ~cap_total ints.
    """
    n_sink = min(n_sink, target)
    recent_len = target - n_sink - refresh_budget
    # The middle that this prune evicts holds length − target + B > B slots, so B refresh slots always fit.
    refresh = _choose_refresh(range(n_sink, length - recent_len), refresh_budget, refresh_policy)
    return n_sink, refresh, tuple(range(n_sink)) + refresh + tuple(range(length - recent_len, length))


def prune_view(view: CacheView, target: int, policy: PolicySpec) -> tuple[CacheView, tuple[int, ...]]:
    """Cut `view` (longer than `target`) to `target` tokens; returns the new view and the kept slots.

    O(B) apart from the memoised `keep`: slots are mapped to tokens through the view, never listed. That
    `keep` and the new view agree is checked by the tests (tests/test_policies.py `_replay`), not per step.
    """
    length = len(view)
    assert target < length, "the decision rule only prunes a cache longer than its target"
    n_sink, refresh, keep = _prune_slots(length, target, policy.n_sink, policy.refresh_budget,
                                         policy.refresh_policy)
    recent_len = target - n_sink - len(refresh)
    new = CacheView(n_sink=n_sink, refresh=tuple(view.token_at(i) for i in refresh),
                    start=view.token_at(length - recent_len) if recent_len else view.end, end=view.end)
    return new, keep


@dataclass(frozen=True)
class Schedule:
    """Everything an engine needs to realise a policy on a stream of `n_tokens` tokens.

    Step 0 is the prefill forward of `prefill_len` = min(CAP_TOTAL, n_tokens) tokens; every later step
    feeds one token. Token n_tokens − 1 is never fed (nothing follows it to predict), so every method
    predicts the same n_tokens − 1 tokens.
    """

    policy: PolicySpec
    n_tokens: int
    prefill_len: int
    steps: tuple[Step, ...]

    @property
    def cache_len_after_step(self) -> list[int]:
        """Cache length after each step's prune: the measured curve of the KV-length figure."""
        return [len(s.after) for s in self.steps]

    @property
    def n_prunes(self) -> int:
        return sum(s.keep is not None for s in self.steps)

    @property
    def contiguous(self) -> bool:
        return all(s.before.contiguous and s.after.contiguous for s in self.steps)

    @property
    def max_visible(self) -> int:
        """Most keys one query attends to (its own included): soft + R for lazy pruning."""
        return max(len(s.before) + (s.fed_end - s.fed_start) for s in self.steps)

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)


def build_schedule(policy: PolicySpec, n_tokens: int) -> Schedule:
    if n_tokens < 2:
        raise SpecError(f"a stream needs at least 2 tokens to predict one, got {n_tokens}")
    pruner = Pruner(policy)
    prefill = min(policy.cap_total, n_tokens)
    view = CacheView(n_sink=0, refresh=(), start=0, end=0)
    steps = []
    fed = [(0, prefill)] + [(t, t + 1) for t in range(prefill, n_tokens - 1)]
    for i, (a, b) in enumerate(fed):
        grown = CacheView(view.n_sink, view.refresh, view.start, b)
        target = pruner.target(len(grown))
        if target is None:
            after, keep = grown, None
        else:
            after, keep = prune_view(grown, target, policy)
        steps.append(Step(index=i, fed_start=a, fed_end=b, before=view, keep=keep, after=after))
        view = after
    return Schedule(policy=policy, n_tokens=n_tokens, prefill_len=prefill, steps=tuple(steps))
