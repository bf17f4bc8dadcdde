"""Execute one RunSpec: load, evaluate, measure, and hand the result to the store.

Which engine produces which number:
- perplexity: spec.engine (recompute for the baseline; parallel, decode, fast or reference for streaming);
- timing: the run itself when measure.timing_engine is empty (its engine decodes token by token and times
  itself); otherwise measure.timing_engine (the fastest exact engine that supports the point, chosen by
  the stage: engines.timing_engine) on the first CAP + measure.timing_tokens tokens of the stream (the
  whole stream when 0), because only real token-by-token decoding has a TPOT. "engines" records both.
Timing protocol (streamkv/timing.py): WARMUP_RUNS untimed, then REPEAT_RUNS timed; TTFT and TPOT are their
medians ± half ranges. Perplexity comes from one evaluation: the engines are deterministic, repeats only
re-time them.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

from . import assets, compile_cache, engines, metrics, shards, timing
from .engines.base import EngineResult
from .policies import build_schedule
from .recorder import Recorder
from .runspec import RunSpec
from .settings import Settings
from .spec import SpecError
from .store import Store


def make(store: Store, settings: Settings, *, progress: bool, device_shared_by: int) -> Runner:
    """A worker's runner of RunSpecs (streamkv/experiments: Stage.runner)."""
    return Runner(store, progress=progress, cpu_threads=settings.cpu_threads, device_shared_by=device_shared_by)


class Runner(Recorder):
    """Runs specs one after another, keeping the last model loaded: a stage runs many points on one."""

    kind = "run"

    def __init__(self, store: Store, *, progress: bool = True, cpu_threads: int = 1, device_shared_by: int = 1):
        super().__init__(store)
        self.progress = progress
        self.device_shared_by = device_shared_by   # recorded in every result's metrics (schema.Metrics)
        # Explicit, never torch's default; the fingerprint records it (fingerprint.collect).
        torch.set_num_threads(cpu_threads)
        # Before any engine compiles: Inductor's caches persist beside the results (streamkv/compile_cache.py).
        compile_cache.configure(store.root)
        self._loaded: tuple | None = None          # (ModelSpec, device, model)
        self._tokenizers: dict = {}                # ModelSpec -> tokenizer, loaded on first text stream

    def _model(self, spec: RunSpec):
        if self._loaded is None or self._loaded[:2] != (spec.model, spec.device):
            self._loaded = None  # drop the old model before loading the next: two may not fit at once
            self._loaded = (spec.model, spec.device, assets.load_model(spec.model, spec.device))
        return self._loaded[2]

    def _stream(self, spec: RunSpec) -> torch.Tensor:
        # Synthetic streams (random-weights timing runs) are token ids already: no tokenizer is needed.
        synthetic = spec.data.path.startswith(assets.SYNTHETIC_PREFIX)
        if not synthetic and spec.model not in self._tokenizers:
            self._tokenizers[spec.model] = assets.load_tokenizer(spec.model)
        ids, data = assets.load_stream(spec.data.name, spec.data.path, self._tokenizers.get(spec.model),
                                       spec.data.n_tokens)
        if data != spec.data:
            raise SpecError(f"stream {spec.data.name} changed since it was planned ({data} vs {spec.data}); "
                            "run the stage again")
        return ids

    def run(self, slot: str, spec: RunSpec, *, output: Path | None = None) -> Path:
        """Evaluate `spec`, write its result for `slot` (at `output` if given) and return the JSON path."""
        model, ids = self._load(spec)
        schedule = None if spec.mode == "baseline" else build_schedule(spec.policy, len(ids))
        quality, timed, timing_engine = self._evaluate(model, ids, spec, schedule)
        return self._write(slot, spec, model, schedule, quality, timed, timing_engine, output)

    def run_part(self, spec: RunSpec, part: tuple[int, int]) -> list[EngineResult]:
        """The baseline's predicted tokens part[0]..part[1]−1 (streamkv/shards.py): its timed repeats, the
        first of which gives the perplexity, under the same timing protocol as `run`."""
        if spec.mode != "baseline":
            raise ValueError(f"only the recompute baseline is split into parts, not a {spec.mode} point")
        model, ids = self._load(spec)
        recompute = engines.get(spec.engine).function

        def run():
            return recompute(model, ids, spec.policy.cap_total, loss_dtype=spec.loss_dtype, part=part,
                             batch=spec.recompute_batch)
        m = spec.measure
        return timing.interleaved({spec.engine: run}, warmup=m.warmup_runs, repeats=m.repeat_runs)[spec.engine]

    def write_merged(self, slot: str, spec: RunSpec, parts: list[tuple[tuple[int, int], list[EngineResult]]]) -> Path:
        """Write the baseline result that `run` would have written, from every part's timed repeats."""
        model = self._load(spec)[0]
        prefill = min(spec.policy.cap_total, spec.data.n_tokens - 1)
        timed = [shards.merge([(r, runs[k]) for r, runs in parts], prefill) for k in range(len(parts[0][1]))]
        return self._write(slot, spec, model, None, timed[0], timed, spec.engine, None)

    def _load(self, spec: RunSpec):
        if spec.device.startswith("cuda") and not torch.cuda.is_available():
            raise SpecError(f"device {spec.device} requested but torch sees no CUDA device "
                            "(use --profile demo on a machine without a GPU)")
        return self._model(spec), self._stream(spec)

    def _write(self, slot: str, spec: RunSpec, model, schedule, quality, timed, timing_engine,
               output: Path | None) -> Path:
        n_tokens = spec.data.n_tokens
        # Every method must score the same tokens (DESIGN: honest numbers); an engine that does not is a bug.
        if quality.nll.numel() != n_tokens - 1:
            raise RuntimeError(f"engine {spec.engine} scored {quality.nll.numel()} tokens, expected {n_tokens - 1}")
        result_metrics = {**_metrics(spec, model.config, schedule, quality, timed),
                          "device_shared_by": self.device_shared_by}
        return self.record(
            slot, spec, result_metrics, quality.nll.float().tolist(), output=output,
            # recompute keeps no cache between steps, so it has no curve to record
            cache_len=list(quality.cache_len_after_step) or None, repeats=result_metrics["repeat_runs"],
            code=spec.code_identity(),
            # The loaded weights' dtype, as torch spells it: compare() reads it as a dtype. The compile
            # cache's counts are this process's so far, hence read at every write.
            fingerprint={**self.fingerprint, "dtype": str(next(model.parameters()).dtype),
                         "compile_cache": compile_cache.record()},
            engines={"perplexity": quality.engine, "timing": timing_engine})

    def _evaluate(self, model, ids: torch.Tensor, spec: RunSpec, schedule):
        """(EngineResult giving the perplexity, timed EngineResults, timing engine name), per the timing
        protocol (streamkv/timing.py): warm-up runs untimed, then the repeats."""
        m = spec.measure
        engine = engines.get(spec.engine)
        if not m.timing_engine:   # the run times itself: its repeats are the timed runs
            shown = []   # a progress bar on the first run only (the baseline's can take minutes)

            def run():
                shown.append(True)
                return engine.evaluate(model, ids, spec, schedule, progress=self.progress and len(shown) == 1)
            runs = timing.interleaved({spec.engine: run}, warmup=m.warmup_runs, repeats=m.repeat_runs)[spec.engine]
            return runs[0], runs, spec.engine
        quality = engine.evaluate(model, ids, spec, schedule, progress=self.progress)
        # The timing engine decodes the first C + timing_tokens + 1 tokens (the whole stream when 0).
        n_timing = len(ids) if m.timing_tokens == 0 else min(len(ids), spec.policy.cap_total + m.timing_tokens + 1)
        prefix = build_schedule(spec.policy, n_timing)
        timer = engines.get(m.timing_engine)
        runs = timing.interleaved({m.timing_engine: lambda: timer.evaluate(model, ids[:n_timing], spec, prefix)},
                                  warmup=m.warmup_runs, repeats=m.repeat_runs)[m.timing_engine]
        return quality, runs, m.timing_engine


def _timing(r) -> dict:
    return {"ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms, "wall_s": r.wall_s, "peak_memory_mb": r.peak_memory_mb}


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.fmean(values)


def _peak_memory(timed) -> dict | None:
    """Per phase, the largest peak over the timed runs; None on CPU."""
    peaks = [r.peak_memory_mb for r in timed if r.peak_memory_mb]
    if not peaks:
        return None
    return {phase: max(p[phase] for p in peaks if phase in p) for phase in peaks[0]}


def timing_metrics(timed) -> dict:
    """The timing columns over the timed repeats (EngineResults): medians ± half ranges (streamkv/timing.py),
    mean wall time, peak memory."""
    tpot = timing.median(r.tpot_ms for r in timed)
    return {
        "ttft_ms": timing.median(r.ttft_ms for r in timed),
        "ttft_ms_spread": timing.spread(r.ttft_ms for r in timed),
        "tpot_ms": tpot,
        "tpot_ms_spread": timing.spread(r.tpot_ms for r in timed),
        "tokens_per_s": 1000.0 / tpot if tpot else None,
        "wall_s": _mean([r.wall_s for r in timed]),
        "peak_memory_mb": _peak_memory(timed),
        "repeat_runs": [_timing(r) for r in timed],
    }


def cache_metrics(spec: RunSpec, config, schedule) -> dict:
    """What the policy makes the cache hold: analytic KV bytes at its largest, visible keys, prunes."""
    if schedule is None:
        # The baseline keeps no cache between steps: each forward holds the KV of one cap-long window.
        max_cached, max_visible, n_prunes = spec.policy.cap_total, spec.policy.cap_total, 0
    else:
        max_cached, max_visible, n_prunes = (max(schedule.cache_len_after_step), schedule.max_visible,
                                             schedule.n_prunes)
    return {"kv_cache_bytes": metrics.kv_cache_bytes(config, max_cached, spec.model.dtype),
            "max_cached_tokens": max_cached, "max_visible_tokens": max_visible, "n_prunes": n_prunes}


def _metrics(spec: RunSpec, config, schedule, quality, timed) -> dict:
    ppl, nll_sum, n = metrics.perplexity(quality.nll)
    return {"perplexity": ppl, "nll_sum": nll_sum, "n_predicted_tokens": n, **timing_metrics(timed),
            **cache_metrics(spec, config, schedule)}
