"""Run specifications: everything that determines a number, frozen and hashed.

A RunSpec is built once per experiment point (by the CLI or a stage plan) and travels unchanged into the
result JSON. `config_hash` is the sha256 of the canonical JSON (sorted keys, no whitespace) of two things:
- `hashed()`: the fields that change the numbers, and only those. A field that cannot move a number is
  marked NOT_HASHED (the stream's file path: the sha256 of the evaluated ids covers its content); the
  baseline hashes its recompute window C, not the seed's S/W split of it; a streaming point hashes its
  recent run W + O, not W and O apart (overlap only widens the window, so under auto-cap every O is the
  same experiment), and δ only where it can act (σ ≥ R > 0). A field added later takes `since(neutral)`:
  it stays out of the hash while it holds the value that reproduces the old behaviour, so adding it leaves
  every stored result current.
- `code_identity()`: the code that produces the numbers, derived from its source (streamkv/code_identity.py):
  the engines that evaluate and time the point and what they import, and the policy module for streaming
  points. Editing any of it makes exactly the results that code made stale; comments and docstrings do not.
Two results are the same experiment exactly when their hashes are equal: the only reuse rule the store
applies.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from types import MappingProxyType

from . import code_identity, engines

REFRESH_POLICIES = ("none", "uniform", "middle")
POSITION_MODES = ("cache", "absolute")
# How a kept key is moved to its new cache slot in `cache` position mode:
#   exact          one rotation from the angle the key was computed at, in fp32 (or float64) arithmetic;
#   composed_fp16  the seed's behaviour, a small rotation per prune applied to the fp16 cache in place,
#                  kept only as a recorded ablation that measures its drift.
REROTATIONS = ("exact", "composed_fp16")
MODES = ("baseline", "streaming")
DTYPES = ("float16", "bfloat16", "float32", "float64")
POLICIES_MODULE = f"{__package__}.policies"   # the schedules of streaming points (named, not imported: it imports this)


class SpecError(ValueError):
    """A knob combination that cannot describe a run; the CLI prints it as one line."""


# Field metadata: recorded in the spec but never hashed (it cannot change a number).
NOT_HASHED = MappingProxyType({"hashed": False})


def since(neutral) -> MappingProxyType:
    """Field metadata of a field added after results exist: hashed only when it differs from `neutral`,
    the value that reproduces what the code did before the field existed."""
    return MappingProxyType({"neutral": neutral})


def digest(doc) -> str:
    """The one hash of the project: sha256 of canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hashed_fields(obj) -> dict:
    """The dataclass `obj` as a dict of its hashed fields (recursively), per their metadata."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not f.metadata.get("hashed", True) or ("neutral" in f.metadata and value == f.metadata["neutral"]):
            continue
        out[f.name] = hashed_fields(value) if dataclasses.is_dataclass(value) else value
    return out


@dataclass(frozen=True)
class PolicySpec:
    """Eviction knobs, named as in the seed guide.

    n_sink S, window W, overlap O, refresh_budget B, compress_every R (0 = never prune),
    cache_slack σ, max_drop δ. soft = S + W + O + B is what a prune cuts back to; hard = soft + σ.
    """

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


@dataclass(frozen=True)
class ModelSpec:
    name: str                 # hub id (paper) or a local directory (demo)
    revision: str             # 40-hex hub revision, or the sha256 of the local safetensors file
    dtype: str = "float16"
    random_weights: bool = False  # architecture only, weights drawn from a fixed seed: timing runs only

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise SpecError(f"unknown dtype {self.dtype!r}; choose one of {DTYPES}")


@dataclass(frozen=True)
class DataSpec:
    name: str                 # e.g. pg19, wikitext, demo-long, demo-short
    path: str = field(metadata=NOT_HASHED)  # stream file, relative to the repository root
    # sha256 of the token ids evaluated (int64 little-endian, after truncation), for text streams and
    # synthetic ones alike: it covers the tokenizer, so a changed tokenizer changes config_hash. The text
    # itself is checked against the stream file's recorded sha256 when it is loaded.
    sha256: str
    n_tokens: int             # tokens evaluated (after --max-eval-tokens truncation)


@dataclass(frozen=True)
class MeasureSpec:
    """How timings are taken (streamkv/timing.py); part of the hash because median ± spread depends on it."""

    warmup_runs: int = 0
    repeat_runs: int = 1
    # Decode steps timed when perplexity comes from another engine (parallel): timing needs real
    # token-by-token decoding, but not over the whole stream. 0 = time the whole stream.
    timing_tokens: int = 0
    # The engine whose token-by-token decoding is timed ("" = the run's own engine, which times itself).
    timing_engine: str = ""

    def __post_init__(self) -> None:
        if self.warmup_runs < 0 or self.repeat_runs < 1 or self.timing_tokens < 0:
            raise SpecError(f"need warmup_runs >= 0, repeat_runs >= 1, timing_tokens >= 0; got {self}")
        if self.timing_engine and not engines.get(self.timing_engine).self_timed:
            raise SpecError(f"timing engine {self.timing_engine!r} does not time itself; choose one of "
                            f"{[n for n in engines.names() if engines.get(n).self_timed]}")


@dataclass(frozen=True)
class RunSpec:
    model: ModelSpec
    data: DataSpec
    mode: str                          # baseline (sliding-window recompute) | streaming (KV cache + policy)
    policy: PolicySpec
    position_mode: str = "cache"
    rerotation: str = "exact"
    engine: str = "decode"
    loss_dtype: str = "float32"
    device: str = "cpu"
    measure: MeasureSpec = field(default_factory=MeasureSpec)

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
        if not self.measure.timing_engine and not engines.get(self.engine).self_timed:
            raise SpecError(f"the {self.engine} engine does not time itself: name a timing engine "
                            "(MeasureSpec.timing_engine) that does")
        for engine in {self.engine, self.measure.timing_engine or self.engine}:
            reason = engines.get(engine).supports(self)
            if reason:
                raise SpecError(reason)
        if self.data is not None and self.policy.cap_total >= self.data.n_tokens:
            # The prefill alone would cover the stream: nothing evicted, no token decoded, nothing measured.
            raise SpecError(f"KV budget C = {self.policy.cap_total} covers all {self.data.n_tokens} tokens of "
                            f"{self.data.name}: nothing would ever be evicted; lower CAP_TOTAL / --cap-total")
        if self.loss_dtype not in ("float32", "float64"):
            raise SpecError(f"loss_dtype must be float32 or float64, got {self.loss_dtype!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        return cls(model=ModelSpec(**d["model"]), data=DataSpec(**d["data"]), mode=d["mode"],
                   policy=PolicySpec(**d["policy"]), position_mode=d["position_mode"],
                   rerotation=d["rerotation"], engine=d["engine"], loss_dtype=d["loss_dtype"],
                   device=d["device"], measure=MeasureSpec(**d["measure"]))

    def hashed(self) -> dict:
        """The fields that change this point's numbers (module doc)."""
        view = hashed_fields(self)
        if self.mode == "baseline":
            # Recomputation forwards the last C tokens whatever S and W add up to it.
            view["policy"] = {"cap_total": self.policy.cap_total}
        else:
            # The schedule only sees soft = S + (W + O) + B.
            policy = view["policy"]
            policy["recent"] = policy.pop("window") + policy.pop("overlap")
            # δ acts only when σ ≥ R > 0: otherwise every δ gives the schedule of δ = 0 (streamkv/policies.py,
            # tested there), so it is hashed as 0 and such points are one experiment, reused as one.
            if not 0 < policy["compress_every"] <= policy["cache_slack"]:
                policy["max_drop"] = 0
        return view

    def code_identity(self) -> dict:
        """The code whose output this point's numbers are: its perplexity engine, the engine that times it,
        and (streaming only; the baseline has no schedule) the policy module, each with what it imports."""
        used = sorted({self.engine, self.measure.timing_engine or self.engine})
        identity = {"engines": {name: engines.get(name).identity for name in used}}
        if self.mode == "streaming":
            identity["policies"] = code_identity.identity(POLICIES_MODULE)
        return identity

    def config_hash(self) -> str:
        return digest({"spec": self.hashed(), "code": self.code_identity()})
