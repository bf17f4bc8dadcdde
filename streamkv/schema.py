"""The result JSON, key by key. One file per run; writers and readers both go through these types.

Bump SCHEMA_VERSION when a key changes meaning; readers report files of another version as foreign.
"""
from __future__ import annotations

import re
from typing import TypedDict, get_type_hints

SCHEMA_VERSION = 2   # 2: ttft_ms/tpot_ms are medians with *_spread (were means with *_std)


class Metrics(TypedDict, total=False):
    perplexity: float            # exp(nll_sum / n_predicted_tokens)
    nll_sum: float               # sum of per-token NLL, fp32 log-softmax, accumulated in fp64
    n_predicted_tokens: int      # tokens scored: n_tokens − 1 for every method on a stream
    ttft_ms: float               # time to first token: the prefill forward (median over repeat runs)
    tpot_ms: float               # decode time per token after the prefill (median over repeat runs)
    tpot_ms_spread: float        # half the range of tpot_ms over repeat runs (0 for one run; timing.py)
    ttft_ms_spread: float        # half the range of ttft_ms over repeat runs
    tokens_per_s: float          # decoded tokens per second, 1000 / tpot_ms
    wall_s: float                # wall time of the whole evaluation of one repeat (mean)
    peak_memory_mb: dict         # per phase ("prefill", "decode"): peak CUDA memory, reset between phases;
                                 # null on CPU, where no allocator statistics exist
    kv_cache_bytes: int          # analytic: max cached tokens × layers × 2 (K, V) × hidden × dtype bytes
    max_cached_tokens: int       # most tokens the cache held after any step (soft + R − 1 for lazy)
    max_visible_tokens: int      # most keys one query attended to, itself included
    n_prunes: int                # prune events over the stream
    repeat_runs: list            # per-repeat {"ttft_ms", "tpot_ms", "wall_s", "peak_memory_mb"}
    device_shared_by: int        # workers placed on the run's GPU, itself included (1: alone; absent in older
                                 # results): above 1, the timings may include the others' work (tables mark them)


class Result(TypedDict, total=False):
    schema_version: int          # SCHEMA_VERSION of the writer
    kind: str                    # "run" (our engines: every stage, bench included), "mit_reference"
    slot: str                    # stage/dataset/label: the table cell it fills, e.g. "main/pg19/lazy"
    config_hash: str             # sha256 of the hashed spec fields + the code identity (RunSpec.config_hash)
    spec: dict                   # RunSpec.to_dict(): every knob of the point, hashed or only recorded
    code: dict                   # RunSpec.code_identity(): {"engines": {name: sha256}, "policies": sha256}
    fingerprint: dict            # streamkv.fingerprint.collect(): git, python, torch, CUDA, GPU, ...
    metrics: Metrics
    engines: dict                # which engine produced what: {"perplexity": "parallel", "timing": "decode"}
    artifacts: dict              # files beside the JSON, relative names: {"nll": "x.nll.f32", "cache_len": ...}
    created_utc: str             # ISO-8601 time the run finished


# Kinds whose metrics must hold a perplexity: every kind a writer produces (bench points are runs too).
_SCORED_KINDS = ("run", "mit_reference")
_HASH = re.compile(r"[0-9a-f]{64}")


def _is(value, kind) -> bool:
    if isinstance(value, bool):   # JSON true is no number, though Python's bool is an int
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _check_metrics(metrics: dict, where: str) -> None:
    """Every known metric has its declared type or is null (a timing the run could not take); other keys
    holding objects are nested metrics (a MIT result's mit_reported) and are checked the same."""
    types = get_type_hints(Metrics)
    for key, value in metrics.items():
        if key in types:
            if value is not None and not _is(value, types[key]):
                raise ValueError(f"{where}{key} is {type(value).__name__} {value!r:.40}, not {types[key].__name__}")
            if key == "peak_memory_mb" and value and not all(_is(v, float) for v in value.values()):
                raise ValueError(f"{where}peak_memory_mb holds a value that is not a number")
        elif isinstance(value, dict):
            _check_metrics(value, f"{where}{key}.")


def validate(doc) -> None:
    """Raise ValueError (one line) unless `doc` is a result of this schema with the declared types.

    Readers call it before a result fills a table cell or is reused: a file edited by hand (a string
    perplexity, null metrics) is reported and recomputed, never rendered or trusted."""
    if not isinstance(doc, dict):
        raise ValueError(f"a JSON {type(doc).__name__}, not an object")
    required = {"schema_version": int, "kind": str, "slot": str, "config_hash": str, "metrics": dict}
    optional = {"spec": dict, "code": dict, "fingerprint": dict, "engines": dict, "artifacts": dict,
                "created_utc": str}
    for key, kind in required.items():
        if key not in doc:
            raise ValueError(f"no {key!r}")
    for key, kind in {**required, **optional}.items():
        if key in doc and not _is(doc[key], kind):
            raise ValueError(f"{key!r} is {type(doc[key]).__name__}, not {kind.__name__}")
    if not _HASH.fullmatch(doc["config_hash"]):
        raise ValueError(f"config_hash {doc['config_hash']!r:.70} is not 64 lowercase hex digits")
    for name in (doc.get("artifacts") or {}).values():
        names = name if isinstance(name, list) else [name]
        if not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in names):
            raise ValueError(f"artifact {name!r:.60} is not a file name beside the result")
    _check_metrics(doc["metrics"], "metrics.")
    if doc["kind"] in _SCORED_KINDS:
        if doc["metrics"].get("perplexity") is None:
            raise ValueError(f"a {doc['kind']} result without metrics.perplexity")
        # exp(mean NLL) is positive; a diverged run may honestly store inf or nan, so those stay readable.
        if doc["metrics"]["perplexity"] <= 0:
            raise ValueError(f"metrics.perplexity {doc['metrics']['perplexity']} is not positive")
