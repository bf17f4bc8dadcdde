"""Score-based policies under lazy pruning: what H2O, TOVA and the like share (kvpress's DecodingPress).

A score policy keeps C = S + W + H slots: the first S tokens (sinks) and the newest W (recent window)
always, and the H others with the highest score. Like Lazy Pruning it prunes only when the cache holds
L ≥ C + R tokens (R = 1: after every token), and then back down to C. When it prunes is therefore known
from the stream length alone (`ScoredSchedule`: the cache-length curve, prune count and visible keys
planning and the result record need); which tokens it keeps is decided while the engine runs, from the
attention the cache received (streamkv/policies/scoring.py), so only engines that hand it their attention
can realise it (engines.Engine.policy_kinds: decode and reference).

A policy of this kind is one dataclass with one decision method,
    score(carried, attention) -> scores [L],
where `attention` [q, L] holds what the q queries just fed paid to each of the L cached slots (the
aggregate over layers and heads, scoring.aggregate) and `carried` [L] is the policy's previous score of
each slot (zero for the newly fed ones). The decode engine hands over a forward's queries at once (the
prefill's C together), the reference engine one query at a time, so a score must not depend on how the
queries are grouped into calls (H2O's sum and TOVA's last row do not; tests/toy_policy.py shows a decay
written per query). Slot order stays the original token order, so the cache remains sinks first, newest
last. No torch is imported here: planning stays torch-free.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Iterator

from ..spec import SpecError, hashed_fields
from .schedule import fed_ranges


@dataclass(frozen=True)
class ScoredPruning:
    """Knobs of a score policy: n_sink S, window W (newest tokens always kept), heavy H (slots chosen by
    score), compress_every R >= 1 (prune when the cache exceeds C = S + W + H by R)."""

    NAME: ClassVar[str]
    KIND: ClassVar[str] = "score"

    n_sink: int
    window: int
    heavy: int
    compress_every: int = 1

    def __post_init__(self) -> None:
        if self.n_sink < 0:
            raise SpecError(f"n_sink must be >= 0, got {self.n_sink}")
        for name in ("window", "heavy", "compress_every"):
            if getattr(self, name) <= 0:
                raise SpecError(f"{self.NAME}: {name} must be > 0, got {getattr(self, name)} (a policy that "
                                "never prunes or keeps no scored slot is Start+Recent / Lazy Pruning)")

    @property
    def cap_total(self) -> int:
        """KV budget C: the prefill covers C tokens and every prune cuts back to C."""
        return self.n_sink + self.window + self.heavy

    @classmethod
    def auto_cap(cls, cap_total: int, n_sink: int, *, heavy: int, **knobs) -> "ScoredPruning":
        """W = C − S − H: the same budget as every other point of the profile."""
        window = cap_total - n_sink - heavy
        if window <= 0:
            raise SpecError(f"auto-cap leaves window {window} <= 0: CAP_TOTAL={cap_total} − n_sink={n_sink} − "
                            f"heavy={heavy}")
        return cls(n_sink=n_sink, window=window, heavy=heavy, **knobs)

    def hashed(self) -> dict:
        """Every knob moves the keep sets, and the name says which score picks them."""
        return {"name": self.NAME, **hashed_fields(self)}

    def to_dict(self) -> dict:
        return {"name": self.NAME, **dataclasses.asdict(self)}

    def score(self, carried, attention):
        """scores [L] of the L cached slots (see the module doc)."""
        raise NotImplementedError

    def schedule(self, n_tokens: int) -> "ScoredSchedule":
        prefill = min(self.cap_total, n_tokens)
        steps, length = [], 0
        for i, (a, b) in enumerate(fed_ranges(prefill, n_tokens)):
            grown = length + b - a
            target = self.cap_total if grown - self.cap_total >= self.compress_every else None
            steps.append(ScoredStep(index=i, fed_start=a, fed_end=b, length_before=length, target=target))
            length = grown if target is None else target
        return ScoredSchedule(policy=self, n_tokens=n_tokens, prefill_len=prefill, steps=tuple(steps))


@dataclass(frozen=True)
class ScoredStep:
    """One forward: tokens [fed_start, fed_end) enter a cache of `length_before` slots; then, if `target`
    is not None, the policy cuts it to `target` slots chosen by score."""

    index: int
    fed_start: int
    fed_end: int
    length_before: int
    target: int | None

    @property
    def prunes(self) -> bool:
        return self.target is not None

    @property
    def length_after(self) -> int:
        return self.length_before + self.fed_end - self.fed_start if self.target is None else self.target


@dataclass(frozen=True)
class ScoredSchedule:
    """A score policy's forwards and prune times; the keep sets come from `scores()` while the engine runs."""

    policy: ScoredPruning
    n_tokens: int
    prefill_len: int
    steps: tuple[ScoredStep, ...]
    contiguous: ClassVar[bool] = False   # kept slots are wherever the scores put them

    def scores(self):
        """A fresh run-time decider for one evaluation (imports torch: only engines call this)."""
        from .scoring import Scores
        return Scores(self.policy)

    @property
    def cache_len_after_step(self) -> list[int]:
        return [s.length_after for s in self.steps]

    @property
    def n_prunes(self) -> int:
        return sum(s.prunes for s in self.steps)

    @property
    def max_visible(self) -> int:
        return max(s.length_before + s.fed_end - s.fed_start for s in self.steps)

    def __iter__(self) -> Iterator[ScoredStep]:
        return iter(self.steps)
