"""TOVA, Token Omission Via Attention (Oren et al., "Transformers are Multi-State RNNs", 2024), under lazy
pruning.

A token's score is the attention the current query (the last token fed) pays to it; nothing is carried
from earlier queries. The paper averages heads within each layer and prunes one token per step; here R
tokens are pruned together, by the attention of the query that triggers the prune, and one keep set is
shared by all layers (scoring.aggregate says why).
"""
from __future__ import annotations

from dataclasses import dataclass

from .scored import ScoredPruning


@dataclass(frozen=True)
class TOVA(ScoredPruning):
    NAME = "tova"

    def score(self, carried, attention):
        return attention[-1]
