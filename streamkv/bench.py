"""The bench stage: decode speed and memory of streaming vs recompute, measured by our own engines.

The seed guide filled this role with MIT's benchmark_streaming.py (speed and memory only, no perplexity;
RUN_MIT_BENCH, MIT_BENCH_GEN_TOKENS). Here the same engines as the paper's tables do the work, so the
numbers differ only by the method: on the first C + N + 1 tokens of each dataset's stream (C = CAP_TOTAL,
N = MIT_BENCH_GEN_TOKENS, default 512), one prefill forward of C tokens, then N tokens decoded one per
forward. The decoded tokens come from the stream (teacher forcing): a forward costs the same whichever
token it is fed, and every method decodes the very same tokens.

  results/mit_bench/{dataset}_benchmark_streaming.json  Start+Recent (strict) and Lazy Pruning with the
                                                         profile's main knobs, decode engine
  results/mit_bench/{dataset}_benchmark_recompute.json  sliding-window recomputation over C tokens

Per method: TTFT (the prefill), TPOT (mean decode step), tokens/s = 1000 / TPOT, wall time, peak memory
per phase (CUDA only; reset between phases), analytic KV bytes. WARMUP_RUNS untimed runs first, then
REPEAT_RUNS timed ones: means, population std, and one file per repeat when there are several.
Each file carries its spec, its config_hash and our fingerprint; a file is reused while its hash holds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import click

from . import assets, engines, fingerprint, profiles, settings as settings_mod, stages, timing
from .policies import build_schedule
from .profiles import Dataset, Profile
from .settings import Settings
from .spec import MeasureSpec, ModelSpec, RunSpec, SpecError
from .store import Store


@dataclasses.dataclass(frozen=True)
class BenchPlan:
    dataset: Dataset
    streaming: dict[str, RunSpec]      # main variant label (strict, lazy) -> spec
    recompute: RunSpec

    @property
    def streaming_slot(self) -> str:
        return f"mit_bench/{self.dataset.name}_benchmark_streaming"

    @property
    def recompute_slot(self) -> str:
        return f"mit_bench/{self.dataset.name}_benchmark_recompute"

    @property
    def streaming_spec(self) -> dict:
        return {label: spec.to_dict() for label, spec in self.streaming.items()}

    @property
    def streaming_hash(self) -> str:
        """sha256 of the canonical JSON of both specs, as RunSpec.config_hash does for one."""
        canonical = json.dumps(self.streaming_spec, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def plan(profile: Profile, settings: Settings, store: Store, dataset: Dataset, model: ModelSpec) -> BenchPlan:
    n_tokens = profile.cap_total + settings.mit_bench_gen_tokens + 1
    # The DataSpec of the stream's first C + N + 1 tokens (cached in the stream index like the stages').
    data = stages.resolve_data(profile, dataclasses.replace(dataset, max_tokens=n_tokens), store, tokenize=True)
    # The decode and recompute engines time themselves: no separate timing_tokens run.
    timing = MeasureSpec(warmup_runs=settings.warmup_runs, repeat_runs=settings.repeat_runs)
    common = dict(model=model, data=data, device=profile.device, measure=timing)
    streaming = {v.label: RunSpec(mode="streaming", policy=profile.policy(v), position_mode=v.position_mode,
                                  rerotation=v.rerotation, engine="decode", **common)
                 for v in profile.main_variants()}
    recompute = RunSpec(mode="baseline", policy=profile.baseline_policy(), engine="recompute", **common)
    return BenchPlan(dataset, streaming, recompute)


def measure(model, ids, spec: RunSpec) -> tuple[dict, list[dict]]:
    """(metrics, per-repeat timings) of `spec` on `ids`: warm-up runs, then timed repeats."""
    # torch comes with the runner: imported here so that `streamkv tables` never loads it
    from .runner import cache_metrics, timing_metrics

    schedule = None if spec.mode == "baseline" else build_schedule(spec.policy, len(ids))
    cap = spec.policy.cap_total if schedule is None else schedule.prefill_len
    engine = engines.get(spec.engine)
    m = spec.measure
    runs = timing.interleaved({spec.engine: lambda: engine.evaluate(model, ids, spec, schedule)},
                              warmup=m.warmup_runs, repeats=m.repeat_runs)[spec.engine]
    n_prefill = min(cap, len(ids))
    out = {"n_prefill_tokens": n_prefill, "n_decoded_tokens": len(ids) - 1 - n_prefill,
           **timing_metrics(runs), **cache_metrics(spec, model.config, schedule)}
    return out, out["repeat_runs"]


def _result(slot: str, config_hash: str, spec: dict, fp: dict, metrics_: dict, engines_: dict, **extra) -> dict:
    return {"kind": "bench", "slot": slot, "config_hash": config_hash, "spec": spec, "fingerprint": fp,
            "metrics": metrics_, "engines": engines_, **extra,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _say(message: str) -> None:
    click.echo(f"bench: {message}", err=True)


def _line(label: str, m: dict) -> str:
    return f"{label} {m['tpot_ms']:.2f} ± {m['tpot_ms_spread']:.2f} ms/token ({m['tokens_per_s']:.1f} tok/s)"


class _Loaded:
    """The model, its tokenizer and fingerprint, loaded on first need: a fully reused stage loads nothing."""

    def __init__(self, model: ModelSpec, device: str):
        self.spec, self.device = model, device
        self._model = self._tokenizer = self._fp = None

    def model(self):
        if self._model is None:
            self._model = assets.load_model(self.spec, self.device)
        return self._model

    def ids(self, data):
        if self._tokenizer is None:
            self._tokenizer = assets.load_tokenizer(self.spec)
        ids, loaded = assets.load_stream(data.name, data.path, self._tokenizer, data.n_tokens)
        if loaded != data:
            raise SpecError(f"stream {data.name} changed while the bench ran ({loaded} vs {data}); run it again")
        return ids

    def fingerprint(self) -> dict:
        if self._fp is None:
            # The loaded weights' dtype, as the runner records it: fingerprint.compare reads it as a dtype.
            self._fp = {**fingerprint.collect(), "dtype": str(next(self.model().parameters()).dtype)}
        return self._fp


def run_bench(settings: Settings, *, random_weights: bool = False, profile: Profile | None = None) -> list[Path]:
    """Both bench files for every dataset of the profile; returns the paths written."""
    profile = profile or profiles.resolve(settings)
    if profile.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SpecError(f"device {profile.device} requested but torch sees no CUDA device "
                            "(use --profile demo on a machine without a GPU)")
    store = Store(settings.results_dir)
    loaded = _Loaded(dataclasses.replace(profile.model, random_weights=random_weights), profile.device)
    written = []
    for dataset in profile.datasets:
        p = plan(profile, settings, store, dataset, loaded.spec)
        todo = []
        for slot, h in ((p.streaming_slot, p.streaming_hash), (p.recompute_slot, p.recompute.config_hash())):
            cell = None if settings.force else store.lookup(slot, h, settings.allow_stale_results)
            if cell is None:
                todo.append(slot)
            else:
                _say(f"{slot}: {'stale, kept (ALLOW_STALE_RESULTS=1)' if cell.stale else 'reused'} ({cell.path})")
        if not todo:
            continue
        model, ids = loaded.model(), loaded.ids(p.recompute.data)
        summary = []
        if p.streaming_slot in todo:
            measured = {label: measure(model, ids, spec) for label, spec in p.streaming.items()}
            result = _result(p.streaming_slot, p.streaming_hash, p.streaming_spec, loaded.fingerprint(),
                             {label: m for label, (m, _) in measured.items()},
                             {label: spec.engine for label, spec in p.streaming.items()},
                             config_hashes={label: spec.config_hash() for label, spec in p.streaming.items()})
            repeats = [{label: t[k] for label, (_, t) in measured.items()} for k in range(settings.repeat_runs)]
            written.append(store.write(result, repeats=repeats))
            summary += [_line(label, m) for label, (m, _) in measured.items()]
        if p.recompute_slot in todo:
            m, timings = measure(model, ids, p.recompute)
            result = _result(p.recompute_slot, p.recompute.config_hash(), p.recompute.to_dict(),
                             loaded.fingerprint(), m, {"timing": "recompute"})
            written.append(store.write(result, repeats=timings))
            summary.append(_line("recompute", m))
        _say(f"{dataset.name}: " + "; ".join(summary))
    return written


@click.command("bench")
@click.option("--profile", default=None, help="demo | paper  [env STREAMKV_PROFILE, default demo]")
@click.option("-f", "--force", is_flag=True, default=None,
              help="Re-measure even when current results exist  [env FORCE]")
@click.option("--results-dir", default=None, help="[env RESULTS_DIR, default results]")
@click.option("--cap-total", type=int, default=None, help="KV budget C, also the prefill length  [env CAP_TOTAL]")
@click.option("--gen-tokens", "mit_bench_gen_tokens", type=int, default=None,
              help="Tokens decoded after the prefill  [env MIT_BENCH_GEN_TOKENS, default 512]")
@click.option("--warmup-runs", type=int, default=None, help="[env WARMUP_RUNS, default 1]")
@click.option("--repeat-runs", type=int, default=None, help="[env REPEAT_RUNS, default 3]")
@click.option("--random-weights", is_flag=True,
              help="Weights drawn from a fixed seed (timing needs no real ones; recorded).")
def bench_command(random_weights: bool, **flags) -> None:
    """Decode speed and memory: Start+Recent and Lazy Pruning vs sliding-window recompute."""
    settings = settings_mod.load(overrides=flags)
    settings_mod.export_hf_home(settings)
    for path in run_bench(settings, random_weights=random_weights):
        click.echo(str(path))
