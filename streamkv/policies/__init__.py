"""Eviction policies as units: one module per policy, each a frozen dataclass that owns its knobs, their
validation, its hashed view (`hashed()`), its record (`to_dict()`, with its NAME) and one decision method.
This registry is the only list of them.

Two kinds (`KIND`), which the engines declare they realise (engines.Engine.policy_kinds):
- "schedule" (lazy.py: Start+Recent and Lazy Pruning with σ/δ/overlap/refresh): the decision reads the
  cache length only, so `schedule(n_tokens)` precomputes every keep set (schedule.Schedule), and any
  engine can realise it, the ones that read the whole schedule as a table (parallel, fast) included;
- "score" (scored.py; h2o.py, tova.py): `score()` reads the attention the cache received, so the keep
  sets are decided while the engine runs (scored.ScoredSchedule.scores()).
A policy's code identity (part of every streaming point's config hash) is its module's, with what it
imports (RunSpec.code_identity): editing one policy makes only its own points stale.

Adding a policy: one module with its dataclass (a `ScoredPruning` subclass needs only NAME and `score`),
one line in REGISTRY.
"""
from __future__ import annotations

from ..spec import SpecError
from .h2o import H2O
from .lazy import PolicySpec, Pruner, prune_view
from .schedule import CacheView, Schedule, Step
from .scored import ScoredPruning, ScoredSchedule, ScoredStep
from .tova import TOVA

__all__ = ["H2O", "TOVA", "CacheView", "PolicySpec", "Pruner", "REGISTRY", "Schedule", "ScoredPruning",
           "ScoredSchedule", "ScoredStep", "Step", "build_schedule", "from_dict", "get", "prune_view"]

REGISTRY: dict[str, type] = {p.NAME: p for p in (
    PolicySpec,   # "lazy": Start+Recent (R = 1) and Lazy Pruning, the seed's knobs
    H2O,
    TOVA,
)}


def get(name: str) -> type:
    try:
        return REGISTRY[name]
    except KeyError:
        raise SpecError(f"unknown policy {name!r}; choose one of {sorted(REGISTRY)}") from None


def from_dict(d: dict):
    """The policy a result records (`to_dict()`); a record without a name predates named policies and
    holds the lazy family's knobs."""
    knobs = dict(d)
    return get(knobs.pop("name", PolicySpec.NAME))(**knobs)


def build_schedule(policy, n_tokens: int) -> Schedule | ScoredSchedule:
    """What the engines follow on a stream of `n_tokens` tokens (Schedule or ScoredSchedule, by kind)."""
    return policy.schedule(n_tokens)
