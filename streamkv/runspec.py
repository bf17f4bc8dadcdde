"""RunSpec: one experiment point, frozen and hashed. Everything that determines its numbers.

A RunSpec is built once per point (by the CLI or a stage plan) and travels unchanged into the result JSON.
It joins the plain data of streamkv/spec.py with a policy unit (streamkv/policies/) and engine names
(streamkv/engines/), and is validated against both registries here, above them, never in spec.py.
`config_hash` is the sha256 of the canonical JSON (spec.digest) of two things:
- `hashed()`: the fields that change the numbers, and only those (spec.hashed_fields). The baseline hashes
  its recompute window C, not the seed's S/W split of it; a streaming point hashes its policy's own view
  (`policy.hashed()`: e.g. Lazy Pruning's W + O and its δ only where it can act).
- `code_identity()`: the code that produces the numbers, derived from its source (streamkv/code_identity.py):
  the engines that evaluate and time the point and what they import, and the policy's module for streaming
  points. Editing any of it makes exactly the results that code made stale; comments and docstrings do not.
Two results are the same experiment exactly when their hashes are equal: the only reuse rule the store
applies.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import code_identity, engines, policies
from .spec import (MODES, POSITION_MODES, REROTATIONS, DataSpec, MeasureSpec, ModelSpec, SpecError, digest,
                   hashed_fields, since)


@dataclass(frozen=True)
class RunSpec:
    model: ModelSpec
    data: DataSpec
    mode: str                          # baseline (sliding-window recompute) | streaming (KV cache + policy)
    policy: policies.PolicySpec | policies.ScoredPruning   # a unit of streamkv.policies.REGISTRY
    position_mode: str = "cache"
    rerotation: str = "exact"
    engine: str = "decode"
    loss_dtype: str = "float32"
    device: str = "cpu"
    measure: MeasureSpec = field(default_factory=MeasureSpec)
    # Windows per forward of the recompute baseline (streamkv/engines/recompute.py). Hashed, though the
    # windows are the same: it sets the forwards' shapes, so on a GPU the fp16 GEMMs may round differently
    # (bit-for-bit equality is what the shards and the equal-hash copies rely on), and the TPOT it records
    # is what batching exists to change. since(1): B = 1 is the engine as it was, one window per forward.
    recompute_batch: int = field(default=1, metadata=since(1))

    def __post_init__(self) -> None:
        checks = ((self.mode, MODES, "mode"), (self.position_mode, POSITION_MODES, "position_mode"),
                  (self.rerotation, REROTATIONS, "rerotation"), (self.engine, engines.names(), "engine"))
        for value, allowed, name in checks:
            if value not in allowed:
                raise SpecError(f"unknown {name} {value!r}; choose one of {allowed}")
        if self.mode == "baseline" and (self.position_mode != "cache" or self.rerotation != "exact"):
            # They would not change the recompute baseline's numbers, only its hash (and so force a recompute).
            raise SpecError(f"the recompute baseline takes position_mode cache and rerotation exact only "
                            f"(got position_mode={self.position_mode}, rerotation={self.rerotation})")
        if self.position_mode == "absolute" and self.rerotation != "exact":
            raise SpecError("rerotation only applies to position_mode cache: absolute mode never moves a key")
        timing = self.measure.timing_engine
        if timing and not engines.get(timing).self_timed:
            raise SpecError(f"timing engine {timing!r} does not time itself; choose one of "
                            f"{[n for n in engines.names() if engines.get(n).self_timed]}")
        if not timing and not engines.get(self.engine).self_timed:
            raise SpecError(f"the {self.engine} engine does not time itself: name a timing engine "
                            "(MeasureSpec.timing_engine) that does")
        for engine in {self.engine, timing or self.engine}:
            reason = engines.get(engine).supports(self)
            if reason:
                raise SpecError(reason)
        if self.data is not None and self.policy.cap_total >= self.data.n_tokens:
            # The prefill alone would cover the stream: nothing evicted, no token decoded, nothing measured.
            raise SpecError(f"KV budget C = {self.policy.cap_total} covers all {self.data.n_tokens} tokens of "
                            f"{self.data.name}: nothing would ever be evicted; lower CAP_TOTAL / --cap-total")
        if self.recompute_batch < 1 or (self.mode != "baseline" and self.recompute_batch != 1):
            raise SpecError(f"recompute_batch must be >= 1, and 1 except for the recompute baseline (got "
                            f"{self.recompute_batch} for a {self.mode} point)")
        if self.loss_dtype not in ("float32", "float64"):
            raise SpecError(f"loss_dtype must be float32 or float64, got {self.loss_dtype!r}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "policy": self.policy.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        return cls(model=ModelSpec(**d["model"]), data=DataSpec(**d["data"]), mode=d["mode"],
                   policy=policies.from_dict(d["policy"]), position_mode=d["position_mode"],
                   rerotation=d["rerotation"], engine=d["engine"], loss_dtype=d["loss_dtype"],
                   device=d["device"], measure=MeasureSpec(**d["measure"]),
                   recompute_batch=d.get("recompute_batch", 1))   # absent from results written before it

    def hashed(self) -> dict:
        """The fields that change this point's numbers (module doc)."""
        view = hashed_fields(self)
        # Recomputation forwards the last C tokens whatever S and W add up to it.
        view["policy"] = {"cap_total": self.policy.cap_total} if self.mode == "baseline" else self.policy.hashed()
        return view

    def code_identity(self) -> dict:
        """The code whose output this point's numbers are: its perplexity engine, the engine that times it,
        and (streaming only; the baseline has no schedule) the policy's module, each with what it imports."""
        used = sorted({self.engine, self.measure.timing_engine or self.engine})
        identity = {"engines": {name: engines.get(name).identity for name in used}}
        if self.mode == "streaming":
            identity["policies"] = code_identity.identity(type(self.policy).__module__)
        return identity

    def config_hash(self) -> str:
        return digest({"spec": self.hashed(), "code": self.code_identity()})
