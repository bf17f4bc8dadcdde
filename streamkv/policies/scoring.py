"""The run-time side of the score policies (streamkv/policies/scored.py): aggregate the attention an engine
hands over, keep each slot's score, choose the slots a prune keeps. Imported by engines only (torch).

Aggregation (one keep set for the whole model): the attention probabilities of every layer and every
query head, averaged, in float64. The papers keep per-head (H2O) or per-layer (TOVA) sets; one set shared
by all layers keeps one slot map for the cache, so the position bookkeeping of `cache` mode (the
re-rotation of every kept key to its slot) and the cache-length accounting stay exactly those of the
schedule policies, and the reference engine can check the decode engine slot for slot.
"""
from __future__ import annotations

import torch


def aggregate(attentions) -> torch.Tensor:
    """[q, L] float64: per query and cached slot, the attention probability averaged over layers and heads.
    `attentions`: one [1, heads, q, L] tensor per layer, as transformers returns them. One stack and one
    mean, not one per layer: the decode engine calls this after every token, where each op is a kernel
    launch (32 layers: 100 launches a token, most of a score policy's decode overhead)."""
    return torch.stack(attentions)[:, 0].to(torch.float64).mean((0, 1))


class Scores:
    """One stream's scores: `attend` after every forward, `prune` once the step's tokens are all fed."""

    def __init__(self, policy):
        self.policy = policy
        self.carried: torch.Tensor | None = None    # [slots] float64, one score per cached slot

    def attend(self, attentions) -> None:
        """The queries just fed (their own slots included: a query sees itself) over the cache they saw."""
        attention = aggregate(attentions)
        carried = attention.new_zeros(attention.shape[1])
        if self.carried is not None:
            carried[:self.carried.numel()] = self.carried
        self.carried = self.policy.score(carried, attention)

    def prune(self, step) -> torch.Tensor | None:
        """The slots `step` keeps (ascending, on the scores' device), or None when it does not prune."""
        if step.target is None:
            return None
        keep = select(self.carried, step.target, self.policy.n_sink, self.policy.window)
        self.carried = self.carried.index_select(0, keep)
        return keep


def select(scores: torch.Tensor, target: int, n_sink: int, window: int) -> torch.Tensor:
    """Of len(scores) slots keep `target`: the first n_sink, the last `window`, and between them the highest
    scores (equal scores: the older slot first, so every engine breaks ties alike)."""
    length, device = scores.numel(), scores.device
    recent = length - window
    heavy = target - n_sink - window
    ranked = scores[n_sink:recent].sort(descending=True, stable=True).indices[:heavy] + n_sink
    return torch.cat((torch.arange(n_sink, device=device), ranked.sort().values,
                      torch.arange(recent, length, device=device)))
