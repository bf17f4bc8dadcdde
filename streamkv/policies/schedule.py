"""What an engine follows: the forwards of a stream and, per forward, the cache before and after the prune.

`Schedule` is the precomputed kind (the `schedule` policies, streamkv/policies/lazy.py): every keep set is
known before any forward, so engines that read the whole schedule as a table (parallel, fast) can realise
it. Score-based policies (streamkv/policies/scored.py) share the forwards (`fed_ranges`) but decide their
keep sets while the engine runs. No torch here: planning stays torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from ..spec import SpecError


def fed_ranges(prefill: int, n_tokens: int) -> list[tuple[int, int]]:
    """Tokens [a, b) of each forward: the prefill of `prefill` tokens, then one token per forward. Token
    n_tokens − 1 is never fed (nothing follows it to predict), so every method predicts n_tokens − 1 tokens."""
    if n_tokens < 2:
        raise SpecError(f"a stream needs at least 2 tokens to predict one, got {n_tokens}")
    return [(0, prefill)] + [(t, t + 1) for t in range(prefill, n_tokens - 1)]


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

    @property
    def prunes(self) -> bool:
        return self.keep is not None


@dataclass(frozen=True)
class Schedule:
    """Everything an engine needs to realise a schedule policy on a stream of `n_tokens` tokens.

    Step 0 is the prefill forward of `prefill_len` = min(CAP_TOTAL, n_tokens) tokens; every later step
    feeds one token (`fed_ranges`).
    """

    policy: object               # the policy unit that built it (streamkv.policies)
    n_tokens: int
    prefill_len: int
    steps: tuple[Step, ...]

    def scores(self) -> None:
        """The run-time decider of a score policy (streamkv/policies/scored.py); a schedule has none: its
        keep sets are `Step.keep`, fixed before any forward."""
        return None

    @property
    def cache_len_after_step(self) -> list[int]:
        """Cache length after each step's prune: the measured curve of the KV-length figure."""
        return [len(s.after) for s in self.steps]

    @property
    def n_prunes(self) -> int:
        return sum(s.prunes for s in self.steps)

    @property
    def contiguous(self) -> bool:
        return all(s.before.contiguous and s.after.contiguous for s in self.steps)

    @property
    def max_visible(self) -> int:
        """Most keys one query attends to (its own included): soft + R for lazy pruning."""
        return max(len(s.before) + (s.fed_end - s.fed_start) for s in self.steps)

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)
