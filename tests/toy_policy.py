"""A policy added the way docs/ARCHITECTURE.md ("How to add a policy") says: this one file, which would sit
at streamkv/policies/decayed.py, plus one line in streamkv.policies.REGISTRY. tests/test_add_a_policy.py
loads it under that name and registers it, and nothing else of the package changes.
"""
from __future__ import annotations

from dataclasses import dataclass

from .scored import ScoredPruning

DECAY = 0.5   # per query: what a score is worth one query later


@dataclass(frozen=True)
class Decayed(ScoredPruning):
    """H2O with forgetting: each query's attention counts DECAY times less with every later query, so
    the heavy hitters are those of the recent past. The decay is per query, not per call: the decode
    engine hands over the prefill's queries at once, the reference engine one by one."""

    NAME = "decayed"

    def score(self, carried, attention):
        queries = attention.shape[0]
        weights = attention.new_tensor([DECAY ** (queries - 1 - i) for i in range(queries)])
        return carried * DECAY ** queries + (weights[:, None] * attention).sum(0)
