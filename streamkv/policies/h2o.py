"""H2O, the Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023), under lazy pruning.

A token's score is the attention it has accumulated over every query since it entered the cache (its own
query included), summed over the queries and carried across prunes: the "heavy hitters" are the tokens
the model keeps attending to. Aggregated over layers and heads into one keep set (scoring.aggregate says
why); the paper keeps a set per head.
"""
from __future__ import annotations

from dataclasses import dataclass

from .scored import ScoredPruning


@dataclass(frozen=True)
class H2O(ScoredPruning):
    NAME = "h2o"

    def score(self, carried, attention):
        return carried + attention.sum(0)
