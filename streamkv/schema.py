"""The result JSON, key by key. One file per run; writers and readers both go through these types.

Bump SCHEMA_VERSION when a key changes meaning; readers report files of another version as foreign.
"""
from __future__ import annotations

import math
import re
from typing import Sequence, TypedDict, get_type_hints

# 2: ttft_ms/tpot_ms are medians with *_spread (were means with *_std); 3: artifact_sha256, and the metrics
# that can be re-derived are checked on every read (check_derived)
SCHEMA_VERSION = 3


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
    artifact_sha256: dict        # file name -> sha256 of each artifact, checked by every reader (store.py)
    created_utc: str             # ISO-8601 time the run finished


# Kinds whose metrics must hold a perplexity: every kind a writer produces (bench points are runs too).
_SCORED_KINDS = ("run", "mit_reference")
_HASH = re.compile(r"[0-9a-f]{64}")
# How closely the stored metrics must agree with what they are derived from. The NLL artifact holds the
# per-token values as float32: a run sums exactly those (fp64), MIT's log holds them in full precision
# before they are stored as float32 (relative differences ~1e-8). A perplexity is exp of the stored mean,
# computed in fp64 from the same numbers. MIT's own perplexity is averaged and exponentiated in the model's
# dtype (fp16: 11 bits; the mean's rounding alone moves exp(mean) by 0.4% at a mean NLL of 8), so it can only
# be held to about that: a hand edit of it by less than 1% goes unnoticed (the number from its log does not).
_NLL_SUM_REL = 1e-6
_PPL_REL = 1e-9
_MIT_OWN_PPL_REL = 1e-2


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
                "artifact_sha256": dict, "created_utc": str}
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
        digests = doc.get("artifact_sha256") or {}
        if not all(isinstance(digests.get(n), str) and _HASH.fullmatch(digests[n]) for n in names):
            raise ValueError(f"artifact {name!r:.60} has no sha256 in artifact_sha256")
    _check_metrics(doc["metrics"], "metrics.")
    if doc["kind"] in _SCORED_KINDS:
        if doc["metrics"].get("perplexity") is None:
            raise ValueError(f"a {doc['kind']} result without metrics.perplexity")
        # exp(mean NLL) is positive; a diverged run may honestly store inf or nan, so those stay readable.
        if doc["metrics"]["perplexity"] <= 0:
            raise ValueError(f"metrics.perplexity {doc['metrics']['perplexity']} is not positive")


def _agrees(stored, derived: float, rel: float) -> bool:
    if not isinstance(stored, (int, float)) or isinstance(stored, bool):
        return False
    if isinstance(stored, float) and math.isnan(stored):
        return math.isnan(derived)   # a diverged run: nan stays nan
    return math.isclose(stored, derived, rel_tol=rel, abs_tol=0.0)


def check_derived(doc: dict, nll: Sequence[float] | None) -> None:
    """Raise ValueError (one line, quoting no number) unless the metrics of a validated result agree with
    what they are derived from: the per-token NLL artifact `nll` (n_predicted_tokens = its length, nll_sum
    = its sum) and, from those, the perplexity exp(nll_sum / n_predicted_tokens). A scored result must have
    them all, so that a perplexity cannot be edited alone by dropping what it is checked against."""
    if doc["kind"] not in _SCORED_KINDS:
        return
    m = doc["metrics"]
    for key in ("nll_sum", "n_predicted_tokens"):
        if m.get(key) is None:
            raise ValueError(f"metrics.{key} is missing: the perplexity cannot be checked")
    if nll is None:
        raise ValueError("no per-token NLL artifact: the perplexity cannot be checked")
    if m["n_predicted_tokens"] != len(nll) or len(nll) == 0:
        raise ValueError("metrics.n_predicted_tokens is not the length of the per-token NLL artifact")
    if not _agrees(m["nll_sum"], math.fsum(nll), _NLL_SUM_REL):
        raise ValueError("metrics.nll_sum is not the sum of the per-token NLL artifact")
    derived = math.exp(m["nll_sum"] / m["n_predicted_tokens"]) if not math.isnan(m["nll_sum"]) else math.nan
    if doc["kind"] == "mit_reference":   # MIT's own number, beside the one from its log
        if not _agrees(m.get("perplexity_from_log"), derived, _PPL_REL):
            raise ValueError("metrics.perplexity_from_log is not exp(nll_sum / n_predicted_tokens)")
        if not _agrees(m["perplexity"], derived, _MIT_OWN_PPL_REL):
            raise ValueError("metrics.perplexity (MIT's own) is not exp(nll_sum / n_predicted_tokens) to fp16 "
                             "precision (1%)")
    elif not _agrees(m["perplexity"], derived, _PPL_REL):
        raise ValueError("metrics.perplexity is not exp(nll_sum / n_predicted_tokens)")
