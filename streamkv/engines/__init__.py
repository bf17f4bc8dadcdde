"""The engines, and everything the rest of the code may know about them: this registry is the only list.

An Engine realises a RunSpec on a token stream and returns an EngineResult (engines/base.py): streaming
engines follow the policy Schedule, the recompute engine is the sliding-window baseline. What an engine
can realise (`supports`) and whether its own evaluation is a timed token-by-token decode (`self_timed`) are
declared here, torch-free, so planning and `make tex` never import torch. The engine's module is imported
on first `evaluate`; its code identity (`identity`, part of every result's config hash) is derived from its
source and what it imports (streamkv/code_identity.py), never bumped by hand.

Adding an engine: one module with an `evaluate` function, one line in REGISTRY.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from .. import code_identity


@dataclass(frozen=True)
class Engine:
    name: str
    self_timed: bool      # its evaluation decodes token by token and times itself (TTFT, TPOT)
    contiguous_only: bool = False   # needs sinks + one recent run (no refresh tokens)
    composed_fp16: bool = False     # can replay the seed's composed fp16 re-rotation (an ablation)
    entry: str = "evaluate"         # the evaluate function of module streamkv.engines.<name>
    # The policy kinds (streamkv/policies: KIND) it realises: "schedule" (keep sets precomputed) always;
    # "score" only where it hands the policy the attention of every forward (decode, reference).
    policy_kinds: frozenset = frozenset({"schedule"})

    def supports(self, spec) -> str | None:
        """None if this engine can realise `spec` (a RunSpec), else the reason it cannot."""
        if spec.mode == "baseline":
            return f"the {self.name} engine evaluates streaming schedules, not the recompute baseline"
        if spec.policy.KIND not in self.policy_kinds:
            return (f"the {self.name} engine realises {'/'.join(sorted(self.policy_kinds))} policies, not the "
                    f"{spec.policy.KIND}-based {spec.policy.NAME}: use an engine that hands it the attention "
                    f"({', '.join(n for n, e in REGISTRY.items() if spec.policy.KIND in e.policy_kinds)})")
        if spec.rerotation == "composed_fp16" and not self.composed_fp16:
            return (f"rerotation composed_fp16 replays the fp16 drift of re-rotating the cache at every prune, "
                    f"which the {self.name} engine never does")
        if self.contiguous_only and not spec.policy.contiguous:
            return (f"the {self.name} engine needs sinks + one contiguous recent run; refresh tokens "
                    "(refresh_budget > 0) break it")
        return None

    @property
    def module(self) -> str:
        return f"{__name__}.{self.name}"

    @property
    def identity(self) -> str:
        """sha256 of the code of this engine's module and of every in-package module it imports."""
        return code_identity.identity(self.module)

    @property
    def function(self):
        """The module's own evaluate function, with its engine-specific keyword options (tests, scripts)."""
        return getattr(importlib.import_module(self.module), self.entry)

    def evaluate(self, model, ids, spec, schedule, *, progress: bool = False):
        """Evaluate `spec` on `ids` [T] following `schedule` (None for the baseline) -> EngineResult."""
        return self.function(model, ids, schedule, position_mode=spec.position_mode, rerotation=spec.rerotation,
                             loss_dtype=spec.loss_dtype, progress=progress)


@dataclass(frozen=True)
class Baseline(Engine):
    """The sliding-window recomputation: no KV cache, no schedule, every token from a fresh cap-long window."""

    def supports(self, spec) -> str | None:
        return None if spec.mode == "baseline" else "the recompute engine evaluates the baseline only"

    def evaluate(self, model, ids, spec, schedule, *, progress: bool = False):
        return self.function(model, ids, spec.policy.cap_total, loss_dtype=spec.loss_dtype, progress=progress,
                             batch=spec.recompute_batch)


SCORED = frozenset({"schedule", "score"})
REGISTRY: dict[str, Engine] = {e.name: e for e in (
    Engine("reference", self_timed=False, policy_kinds=SCORED),        # float64 yardstick, slow
    Engine("decode", self_timed=True, composed_fp16=True, policy_kinds=SCORED),   # HF forward + DynamicCache
    Engine("periods", self_timed=False, composed_fp16=True, policy_kinds=SCORED),   # decode, a forward per prune
    Engine("parallel", self_timed=False, contiguous_only=True),   # chunked masked evaluation
    Engine("fast", self_timed=True, contiguous_only=True),  # ring buffer, captured step
    Baseline("recompute", self_timed=True, entry="evaluate_recompute"),
)}

# Timing engines, fastest first: a point is timed by the first that supports it (`timing_engine`).
TIMING_PREFERENCE = ("fast", "decode")


def names() -> tuple[str, ...]:
    return tuple(sorted(REGISTRY))


def get(name: str) -> Engine:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose one of {names()}") from None


def timing_engine(spec) -> str:
    """The fastest exact engine that can time `spec` token by token."""
    if spec.mode == "baseline":
        return "recompute"
    return next(name for name in TIMING_PREFERENCE if REGISTRY[name].supports(spec) is None)
