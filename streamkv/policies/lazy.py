"""Start+Recent and Lazy Pruning (the seed's rule): a pure integer schedule, precomputed from the stream
length alone (no torch), so every engine can realise it, the table-reading ones (parallel, fast) included.

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

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

from ..spec import SpecError, hashed_fields
from .schedule import CacheView, Schedule, Step, fed_ranges

REFRESH_POLICIES = ("none", "uniform", "middle")


@dataclass(frozen=True)
class PolicySpec:
    """Eviction knobs, named as in the seed guide.

    n_sink S, window W, overlap O, refresh_budget B, compress_every R (0 = never prune),
    cache_slack σ, max_drop δ. soft = S + W + O + B is what a prune cuts back to; hard = soft + σ.
    """

    NAME: ClassVar[str] = "lazy"
    KIND: ClassVar[str] = "schedule"

    n_sink: int
    window: int
    overlap: int = 0
    refresh_budget: int = 0
    refresh_policy: str = "none"
    compress_every: int = 1
    cache_slack: int = 0
    max_drop: int = 0

    def __post_init__(self) -> None:
        for name in ("n_sink", "overlap", "refresh_budget", "compress_every", "cache_slack", "max_drop"):
            if getattr(self, name) < 0:
                raise SpecError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.window <= 0:
            raise SpecError(f"window must be > 0, got {self.window}")
        if self.refresh_policy not in REFRESH_POLICIES:
            raise SpecError(f"unknown refresh_policy {self.refresh_policy!r}; choose one of {REFRESH_POLICIES}")
        if (self.refresh_budget > 0) != (self.refresh_policy != "none"):
            raise SpecError("refresh_budget > 0 needs refresh_policy uniform|middle, and a refresh policy needs "
                            f"refresh_budget > 0 (got B={self.refresh_budget}, policy={self.refresh_policy})")

    @property
    def soft(self) -> int:
        return self.n_sink + self.window + self.overlap + self.refresh_budget

    @property
    def hard(self) -> int:
        return self.soft + self.cache_slack

    @property
    def cap_total(self) -> int:
        """KV budget C: the prefill covers C tokens, the seed's CAP_TOTAL."""
        return self.hard

    @property
    def contiguous(self) -> bool:
        """Every cache is sinks + one recent run (no refresh tokens): what the engines that read the
        schedule as a table (parallel, fast) can realise."""
        return self.refresh_budget == 0

    @property
    def never_prunes(self) -> bool:
        return self.compress_every == 0

    @classmethod
    def auto_cap(cls, cap_total: int, n_sink: int, *, overlap: int = 0, refresh_budget: int = 0,
                 cache_slack: int = 0, **knobs) -> "PolicySpec":
        """The seed's auto-cap: W = CAP_TOTAL − S − σ − O − B, so every variant spends the same budget."""
        window = cap_total - n_sink - cache_slack - overlap - refresh_budget
        if window <= 0:
            raise SpecError(f"auto-cap leaves window {window} <= 0: CAP_TOTAL={cap_total} − n_sink={n_sink} − "
                            f"cache_slack={cache_slack} − overlap={overlap} − refresh_budget={refresh_budget}")
        return cls(n_sink=n_sink, window=window, overlap=overlap, refresh_budget=refresh_budget,
                   cache_slack=cache_slack, **knobs)

    def hashed(self) -> dict:
        """The knobs that move a number. The schedule only sees soft = S + (W + O) + B, so the recent run
        W + O is hashed, not W and O apart (under auto-cap every O is the same experiment); and δ acts only
        when σ ≥ R > 0 (tests/test_policies.py proves every other δ gives the schedule of δ = 0), so it is
        hashed as 0 there and such points are one experiment, reused as one. No name: this family's points
        were hashed before policies had names, and keep their hashes."""
        view = hashed_fields(self)
        view["recent"] = view.pop("window") + view.pop("overlap")
        if not 0 < self.compress_every <= self.cache_slack:
            view["max_drop"] = 0
        return view

    def to_dict(self) -> dict:
        return {"name": self.NAME, **dataclasses.asdict(self)}

    def schedule(self, n_tokens: int) -> Schedule:
        """The whole stream's schedule, from its length alone."""
        pruner = Pruner(self)
        prefill = min(self.cap_total, n_tokens)
        view = CacheView(n_sink=0, refresh=(), start=0, end=0)
        steps = []
        for i, (a, b) in enumerate(fed_ranges(prefill, n_tokens)):
            grown = CacheView(view.n_sink, view.refresh, view.start, b)
            target = pruner.target(len(grown))
            after, keep = (grown, None) if target is None else prune_view(grown, target, self)
            steps.append(Step(index=i, fed_start=a, fed_end=b, before=view, keep=keep, after=after))
            view = after
        return Schedule(policy=self, n_tokens=n_tokens, prefill_len=prefill, steps=tuple(steps))


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
