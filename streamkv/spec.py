"""The vocabulary of run specifications, at the bottom of the import graph: it imports nothing of the
project, so every module may import it and none of it can form a circle.

- `SpecError` (a knob combination that cannot describe a run; the CLI prints it as one line);
- `digest(doc)`, the project's one hash (sha256 of canonical JSON), and `hashed_fields(obj)`, a
  dataclass as the dict of the fields that move a number: a field marked NOT_HASHED is recorded but
  never hashed (the stream's file path: the sha256 of the evaluated ids covers its content); a field
  added later takes `since(neutral)` and stays out of the hash while it holds the value that reproduces
  the old behaviour, so adding it leaves every stored result current;
- the parts of a point that are plain data: `ModelSpec`, `DataSpec`, `MeasureSpec`, and the names of
  modes, position modes, re-rotations and dtypes.
What joins them with a policy (streamkv/policies/) and an engine (streamkv/engines/) into one hashed
point is `streamkv.runspec.RunSpec`, which stands above all three.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from types import MappingProxyType

POSITION_MODES = ("cache", "absolute")
# How a kept key is moved to its new cache slot in `cache` position mode:
#   exact          one rotation from the angle the key was computed at, in fp32 (or float64) arithmetic;
#   composed_fp16  the seed's behaviour, a small rotation per prune applied to the fp16 cache in place,
#                  kept only as a recorded ablation that measures its drift.
REROTATIONS = ("exact", "composed_fp16")
MODES = ("baseline", "streaming")
DTYPES = ("float16", "bfloat16", "float32", "float64")


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
