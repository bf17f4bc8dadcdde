"""The result JSON, key by key. One file per run; writers and readers both go through these types.

Bump SCHEMA_VERSION when a key changes meaning; readers report files of another version as foreign.
"""
from __future__ import annotations

from typing import TypedDict

SCHEMA_VERSION = 1


class Metrics(TypedDict, total=False):
    perplexity: float            # exp(nll_sum / n_predicted_tokens)
    nll_sum: float               # sum of per-token NLL, fp32 log-softmax, accumulated in fp64
    n_predicted_tokens: int      # tokens scored: n_tokens − 1 for every method on a stream
    ttft_ms: float               # time to first token: the prefill forward (mean over repeat runs)
    tpot_ms: float               # decode time per token after the prefill (mean over repeat runs)
    tpot_ms_std: float           # population std of tpot_ms over repeat runs (0 for one run)
    ttft_ms_std: float           # population std of ttft_ms over repeat runs
    tokens_per_s: float          # decoded tokens per second, 1000 / tpot_ms
    wall_s: float                # wall time of the whole evaluation of one repeat (mean)
    peak_memory_mb: dict         # per phase ("prefill", "decode"): peak CUDA memory, reset between phases;
                                 # null on CPU, where no allocator statistics exist
    kv_cache_bytes: int          # analytic: max cached tokens × layers × 2 (K, V) × hidden × dtype bytes
    max_cached_tokens: int       # most tokens the cache held after any step (soft + R − 1 for lazy)
    max_visible_tokens: int      # most keys one query attended to, itself included
    n_prunes: int                # prune events over the stream
    repeat_runs: list            # per-repeat {"ttft_ms", "tpot_ms", "wall_s", "peak_memory_mb"}


class Result(TypedDict, total=False):
    schema_version: int          # SCHEMA_VERSION of the writer
    kind: str                    # "run" (our engines), "mit_reference", "bench"
    slot: str                    # stage/dataset/label: the table cell it fills, e.g. "main/pg19/lazy"
    config_hash: str             # sha256 of the canonical spec JSON (streamkv.spec.RunSpec.config_hash)
    spec: dict                   # RunSpec.to_dict(): everything that determines the numbers
    fingerprint: dict            # streamkv.fingerprint.collect(): git, python, torch, CUDA, GPU, ...
    metrics: Metrics
    engines: dict                # which engine produced what: {"perplexity": "parallel", "timing": "decode"}
    artifacts: dict              # files beside the JSON, relative names: {"nll": "x.nll.f32", "cache_len": ...}
    created_utc: str             # ISO-8601 time the run finished
