"""Stages: plan experiment points from the profile and the knobs, compute what is missing, report.

A plan is a list of Points (slot, spec): one loop (`execute`) plans, reuses, copies and writes every kind
of point through the store. Slots (docs/ARCHITECTURE.md):
  baselines/{dataset}                      the fixed sliding-window-recompute baseline, both datasets
  main/{dataset}/{strict,lazy}             both datasets
  ablations/{long}/{label}                 the profile's ladder on the long dataset
  sweeps/{long}/{R,sigma,delta}={v}        R always; σ and δ with RUN_QUALITY_HEURISTICS=1
  mit_bench/{dataset}_benchmark_{streaming_strict,streaming_lazy,recompute}
                                           bench: decode speed and memory on the first C + N + 1 tokens
  mit_bench/{dataset}_mit_reference[_windowmatch]
                                           MIT's eval_long_ppl.py (a mit.MitSpec), run by mit.MitRunner

Execution, per point: reuse a result with the planned config_hash; copy one that another slot holds with
the same hash (the R=64 sweep point is the main lazy point); otherwise compute it. A stale result (same
slot, other hash) is recomputed, or kept under ALLOW_STALE_RESULTS=1; either way it is listed. Results
are written one by one, atomically, so after a kill -9 a re-run computes only the points not yet written.

The baseline is reused across runs whatever REPEAT_RUNS says (only `baseline --runs N` asks for another
count); on reuse its fingerprint is compared with this machine's: a warning, or a re-run under
STRICT_BASELINE_CHECK=1. The other stages need it: a missing one is generated when AUTO_BASELINE=1.

The tables and status paths plan without tokenizing (no model, no torch of ours): each stream's DataSpec
comes from the stream index that computing stages write (results/streams/{dataset}.json), valid while the
stream file, the model and the token budget are those it was made for.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import assets, engines, figures, fingerprint, mit, profiles, tables
from .profiles import SWEEP_SYMBOLS, Dataset, Profile, Variant
from .settings import Settings, default_results_dir
from .spec import DataSpec, MeasureSpec, RunSpec
from .store import Store, atomic_write



BASELINE_DISPLAY = "Baseline (sliding-window recompute)"


class StageError(ValueError):
    """A stage that cannot proceed as configured; the CLI prints it as one line."""


@dataclass(frozen=True)
class Point:
    slot: str
    # None: the dataset's DataSpec is unknown (planning without tokenizing). Any spec has config_hash(),
    # to_dict() and engine; a RunSpec is run by runner.Runner, a mit.MitSpec by mit.MitRunner.
    spec: RunSpec | mit.MitSpec | None
    display: str = ""         # the label tables and figures print for it
    value: int | None = None  # a sweep point's knob value


@dataclass
class Context:
    settings: Settings
    profile: Profile
    store: Store
    random_weights: bool = False
    tokenize: bool = True      # plans may tokenize streams the stream index does not know
    _data: dict = field(default_factory=dict)   # Dataset -> DataSpec | None, resolved on first need
    _mit: list | None = None                    # mit.plan(), made on first need

    def data(self, dataset: Dataset) -> DataSpec | None:
        """The dataset's DataSpec (None: unknown and not tokenized); a stage that never asks (MIT's
        reference, which reads the stream file itself) never loads a tokenizer."""
        if dataset not in self._data:
            self._data[dataset] = resolve_data(self.profile, dataset, self.store, tokenize=self.tokenize)
        return self._data[dataset]

    def mit(self) -> list:
        """MIT's reference points (mit.Planned), planned once: planning asks MIT's interpreter for versions."""
        if self._mit is None:
            self._mit = mit.plan(self.profile, self.settings, lambda d, label: variant_slot("main", d, label))
        return self._mit

    @property
    def model(self):
        return dataclasses.replace(self.profile.model, random_weights=self.random_weights)


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


# ------------------------------------------------------------------------------------------ stream index
def _index_key(profile: Profile, dataset: Dataset) -> dict:
    """What a stream's DataSpec depends on. The file's sha256 is None when the file is absent (a machine that
    holds results/ but not the paper's assets): `make tex` still finds the entry by path and model."""
    file = Path(dataset.path) if Path(dataset.path).is_absolute() else assets.REPO / dataset.path
    return {"path": dataset.path, "file_sha256": assets.sha256_file(file) if file.is_file() else None,
            "max_tokens": dataset.max_tokens, "model": [profile.model.name, profile.model.revision],
            # A local checkpoint's revision pins only its weights; the ids also depend on its tokenizer.
            "tokenizer_sha256": assets.tokenizer_sha256(profile.model)}


def _matches(stored: dict, key: dict) -> bool:
    if key["file_sha256"] is None:   # file absent: the newest entry for the same path, budget and model
        return {**stored, "file_sha256": None} == key
    return stored == key


def resolve_data(profile: Profile, dataset: Dataset, store: Store, *, tokenize: bool) -> DataSpec | None:
    """The dataset's DataSpec: from the stream index when it is valid, else by tokenizing (if allowed)."""
    index = store.root / "streams" / f"{dataset.name}.json"
    key = _index_key(profile, dataset)
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))["entries"]
        for entry in reversed(entries):
            if _matches(entry["key"], key):
                return DataSpec(**entry["data"])
    except FileNotFoundError:
        entries = []
    except (OSError, ValueError, KeyError, TypeError) as err:
        # The index is a cache, never a source of truth, but without it `tables` and `status` cannot tell
        # current results from stale ones: say which file is broken (a stage run rewrites it).
        _say(f"warning: stream index {index} is unreadable ({type(err).__name__}: {err}); "
             f"{dataset.name} results cannot be matched until a stage re-tokenizes the stream")
        entries = []
    if not tokenize:
        return None
    synthetic = dataset.path.startswith(assets.SYNTHETIC_PREFIX)  # random ids: no tokenizer to load
    tokenizer = None if synthetic else assets.load_tokenizer(profile.model)
    _, data = assets.load_stream(dataset.name, dataset.path, tokenizer, dataset.max_tokens)
    if key["file_sha256"] is not None:
        # Every key stays (the file is a few lines per token budget): evicting the stages' own entry would
        # leave `make tex` without the DataSpecs it needs to recognise current results.
        entries = [e for e in entries if e.get("key") != key] + [{"key": key, "data": dataclasses.asdict(data)}]
        atomic_write(index, json.dumps({"entries": entries}, indent=2).encode())
    return data


def context(settings: Settings, *, tokenize: bool, random_weights: bool = False,
            profile: Profile | None = None) -> Context:
    profile = profile or profiles.resolve(settings)
    return Context(settings, profile, Store(settings.results_dir), random_weights, tokenize)


# ----------------------------------------------------------------------------------------------- plans
def warmup_runs(ctx: Context) -> int:
    """WARMUP_RUNS, but at least one on CUDA: the first run pays compilation, graph capture and kernel plans."""
    s = ctx.settings
    return max(s.warmup_runs, 1) if ctx.profile.device.startswith("cuda") else s.warmup_runs


def with_engines(ctx: Context, draft: RunSpec, engine: str | None = None) -> RunSpec:
    """`draft` with its perplexity engine (`engine`, else the profile's where it can realise the point, else
    decode, which realises every streaming point) and its timing protocol (streamkv/timing.py): the fastest
    exact engine that can time it, which is the run itself when that is its perplexity engine."""
    if draft.mode == "baseline":
        engine = "recompute"
    elif engine is None:
        preferred = ctx.profile.perplexity_engine
        engine = preferred if engines.get(preferred).supports(draft) is None else "decode"
    timing = engines.timing_engine(draft)   # what can time a point depends on the point, not its engine
    own = timing == engine
    return dataclasses.replace(draft, engine=engine, measure=MeasureSpec(
        warmup_runs=warmup_runs(ctx), repeat_runs=ctx.settings.repeat_runs,
        timing_tokens=0 if own else ctx.profile.timing_tokens, timing_engine="" if own else timing))


def streaming_spec(ctx: Context, dataset: Dataset, variant: Variant) -> RunSpec | None:
    policy = ctx.profile.policy(variant)   # a bad knob fails here, with or without the DataSpec
    data = ctx.data(dataset)
    if data is None:
        return None
    draft = RunSpec(model=ctx.model, data=data, mode="streaming", policy=policy, position_mode=variant.position_mode,
                    rerotation=variant.rerotation, engine="decode", device=ctx.profile.device)
    return with_engines(ctx, draft)


def _stored_spec(store: Store, slot: str) -> RunSpec | None:
    try:
        return RunSpec.from_dict(store.read(store.path(slot))["spec"])
    except (ValueError, KeyError, TypeError):
        return None


def plan_baseline(ctx: Context, runs: int | None = None, datasets: tuple[Dataset, ...] | None = None) -> list[Point]:
    """The recompute baseline per dataset. Without `runs`, a stored baseline that differs only in its
    repeat count is the one wanted: the baseline is fixed and reused, not re-timed per REPEAT_RUNS."""
    points = []
    for d in datasets or ctx.profile.datasets:
        slot = f"baselines/{d.name}"
        data = ctx.data(d)
        spec = None if data is None else RunSpec(
            model=ctx.model, data=data, mode="baseline", policy=ctx.profile.baseline_policy(), engine="recompute",
            device=ctx.profile.device,
            # No warm-up run: one baseline run recomputes a full window per token for the whole stream
            # (PG19: minutes), and its TPOT is a mean over thousands of steps, the first few included.
            measure=MeasureSpec(0, runs or 1))
        stored = _stored_spec(ctx.store, slot)
        if spec is not None and runs is None and stored is not None \
                and dataclasses.replace(stored, measure=spec.measure) == spec:
            spec = stored
        points.append(Point(slot, spec, BASELINE_DISPLAY))
    return points


def variant_slot(stage: str, dataset: Dataset, label: str) -> str:
    return f"{stage}/{dataset.name}/{label}"


def _variant_points(ctx: Context, stage: str, dataset: Dataset, variants) -> list[Point]:
    return [Point(variant_slot(stage, dataset, v.label), streaming_spec(ctx, dataset, v), v.display, v.value)
            for v in variants]


def plan_main(ctx: Context, datasets: tuple[Dataset, ...] | None = None) -> list[Point]:
    return [p for d in datasets or ctx.profile.datasets
            for p in _variant_points(ctx, "main", d, ctx.profile.main_variants())]


def plan_ablations(ctx: Context) -> list[Point]:
    ladder = ctx.profile.ablations(ctx.settings.run_quality_heuristics)
    return _variant_points(ctx, "ablations", ctx.profile.long, ladder)


def _sweep_points(ctx: Context) -> dict[str, list[Point]]:
    return {knob: _variant_points(ctx, "sweeps", ctx.profile.long, variants)
            for knob, variants in ctx.profile.sweeps(ctx.settings.run_quality_heuristics).items()}


def plan_sweeps(ctx: Context) -> list[Point]:
    return [p for points in _sweep_points(ctx).values() for p in points]


# The engine comparison of the bench: the seed's style of decoding (HF forward, DynamicCache, eviction by
# re-slicing the cache) beside the ring-buffer engine, each timing itself on the same tokens.
BENCH_ENGINES = (("decode", "streaming", "HF decode"), ("fast", "fast", "fast (ring buffer)"))


def plan_bench(ctx: Context) -> list[Point]:
    """Decode speed and memory of each method on the first C + N + 1 tokens of each stream (N =
    MIT_BENCH_GEN_TOKENS): one prefill forward of C tokens, then N tokens decoded one per forward, fed from
    the stream (teacher forcing: a forward costs the same whichever token it is fed, and every method
    decodes the very same tokens). The seed guide filled this role with MIT's benchmark_streaming.py;
    here the paper's own engines do it: the decode engine for Start+Recent and Lazy Pruning (it times
    itself), the recompute engine for the baseline. Each is an ordinary point with its own spec.
    On the long stream, the engine comparison (`bench_engine_points`) adds no eviction and the fast engine."""
    p, points = ctx.profile, []
    for d in p.datasets:
        data = _bench_data(ctx, d)
        points += _bench_points(ctx, d, data, "decode", p.main_variants())
        spec = None if data is None else RunSpec(mode="baseline", policy=p.baseline_policy(), engine="recompute",
                                                 model=ctx.model, data=data, device=p.device, measure=_bench_timing(ctx))
        points.append(Point(f"mit_bench/{d.name}_benchmark_recompute", spec, BASELINE_DISPLAY))
    return points + [pt for row in bench_engine_points(ctx) for pt in row[1]]


def bench_engine_points(ctx: Context) -> list[tuple[str, list[Point]]]:
    """(engine display, its points: no eviction, then the main variants) per engine of BENCH_ENGINES."""
    d = ctx.profile.long
    data = _bench_data(ctx, d)
    return [(display, _bench_points(ctx, d, data, engine, ctx.profile.engine_variants()))
            for engine, _, display in BENCH_ENGINES]


def _bench_data(ctx: Context, d: Dataset):
    return ctx.data(dataclasses.replace(d, max_tokens=ctx.profile.cap_total + ctx.settings.mit_bench_gen_tokens + 1))


def _bench_timing(ctx: Context) -> MeasureSpec:
    return MeasureSpec(warmup_runs=warmup_runs(ctx), repeat_runs=ctx.settings.repeat_runs)


def _bench_points(ctx: Context, d: Dataset, data, engine: str, variants) -> list[Point]:
    stem = next(stem for name, stem, _ in BENCH_ENGINES if name == engine)
    p = ctx.profile
    return [Point(f"mit_bench/{d.name}_benchmark_{stem}_{v.label}", None if data is None else RunSpec(
                mode="streaming", policy=p.policy(v), position_mode=v.position_mode, rerotation=v.rerotation,
                engine=engine, model=ctx.model, data=data, device=p.device, measure=_bench_timing(ctx)), v.display)
            for v in variants]


def plan_mit(ctx: Context) -> list[Point]:
    return [Point(m.slot, m.spec, m.reference.display) for m in ctx.mit()]


PLANNERS = {"main": plan_main, "ablations": plan_ablations, "sweeps": plan_sweeps, "bench": plan_bench,
            "mit": plan_mit}
COMPARED_WITH_BASELINE = ("main", "ablations", "sweeps")


def paper_stages(settings: Settings) -> tuple[str, ...]:
    """What `paper` runs and the tables show: RUN_ABLATIONS / RUN_SWEEPS switch those stages off,
    RUN_MIT_REFERENCE / RUN_MIT_BENCH switch the optional ones on."""
    s = settings
    return (("baseline", "main") + ("ablations",) * s.run_ablations + ("sweeps",) * s.run_sweeps
            + ("mit",) * s.run_mit_reference + ("bench",) * s.run_mit_bench)


def plan(ctx: Context, names, *, runs: int | None = None) -> list[Point]:
    """Points of the named stages, the baselines they compare against first, each slot once."""
    needs_baseline = "baseline" not in names and any(n in COMPARED_WITH_BASELINE for n in names)
    points = _required_baselines(ctx, names) if needs_baseline else []
    for name in names:
        points += plan_baseline(ctx, runs) if name == "baseline" else PLANNERS[name](ctx)
    unique = {}
    for p in points:
        unique.setdefault(p.slot, p)
    return list(unique.values())


def _required_baselines(ctx: Context, names) -> list[Point]:
    datasets = ctx.profile.datasets if "main" in names else (ctx.profile.long,)
    points = plan_baseline(ctx, datasets=datasets)
    s = ctx.settings
    if s.auto_baseline or s.force:
        return points
    # A stale baseline would be recomputed just like a missing one: AUTO_BASELINE=0 forbids both.
    unusable = {"missing"} if s.allow_stale_results else {"missing", "stale"}
    lacking = [str(ctx.store.path(p.slot)) for p in points if classify(ctx, p) in unusable]
    if lacking:
        raise StageError(f"no usable baseline ({', '.join(lacking)}) and AUTO_BASELINE=0: run "
                         "`streamkv baseline` first, or set AUTO_BASELINE=1")
    return points


# -------------------------------------------------------------------------------------------- execution
def classify(ctx: Context, point: Point) -> str:
    """current | stale | missing (absent or unreadable) | unknown (no DataSpec to hash against)."""
    if point.spec is None:
        return "unknown"
    cell = ctx.store.lookup(point.slot, point.spec.config_hash(), allow_stale=True)
    if cell is None:
        return "missing"
    return "stale" if cell.stale else "current"


def _baseline_moved(ctx: Context, point: Point, here: dict) -> list[str]:
    stored = ctx.store.read(ctx.store.path(point.slot)).get("fingerprint") or {}
    return fingerprint.compare(stored, {**here, "dtype": point.spec.model.dtype})


@dataclass
class Outcome:
    computed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)      # runs that ended without a result (MIT's script)
    copied: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    stale_kept: list[str] = field(default_factory=list)
    stale_replaced: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)   # written by a concurrent run while this one waited


def _identity(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _written_meanwhile(store: Store, slot: str, config_hash: str, planned: tuple | None) -> bool:
    """Whether another process wrote the slot's result for this hash since this run planned it. File
    identity, not clocks: nodes sharing a results directory need not agree on the time."""
    path = store.path(slot)
    if _identity(path) == planned:
        return False
    try:
        return store.read(path)["config_hash"] == config_hash
    except ValueError:
        return False


def execute(ctx: Context, points: list[Point], *, runner=None, label: str = "points") -> Outcome:
    """Compute the points that need it; returns what happened to each slot.

    Concurrent runs on one results directory split the work: a point is computed only under its config
    hash's claim (Store.claim). A run first takes the points nobody holds, then waits for the others and
    finds them written (or copies them, or computes what a killed holder left undone)."""
    s, store, out = ctx.settings, ctx.store, Outcome()
    for leftover in store.sweep():
        _say(f"removed what a killed write left: {leftover}")
    scan = store.scan()
    for problem in scan.problems:
        _say(f"skipped: {problem}")
    # Every readable result by hash, so an equal spec in another slot is copied instead of recomputed (every
    # kind hashes its own spec type, so equal hashes are the same experiment whatever the kind).
    by_hash = {} if s.force else {e.config_hash: e.path for e in scan.entries}
    here = None
    todo = []
    for p in points:
        state = "missing" if s.force else classify(ctx, p)
        if state == "current" and p.slot.startswith("baselines/"):
            here = here or fingerprint.collect()
            moved = _baseline_moved(ctx, p, here)
            if moved:
                action = "re-running it (STRICT_BASELINE_CHECK=1)" if s.strict_baseline_check else \
                    "reusing it; STRICT_BASELINE_CHECK=1 re-runs it"
                _say(f"warning: {p.slot} was measured in another environment ({'; '.join(moved)}); {action}")
                if s.strict_baseline_check:
                    todo.append((p, False))   # a re-measurement: never a copy of the old numbers
                    continue
        if state == "current":
            out.reused.append(p.slot)
        elif state == "stale" and s.allow_stale_results:
            out.stale_kept.append(p.slot)
        else:
            if state == "stale":
                out.stale_replaced.append(p.slot)
            todo.append((p, True))
    planned = {p.slot: _identity(store.path(p.slot)) for p, _ in todo}
    runners = _Runners(ctx, runner)
    scale_out = None if runner is not None else _scale_out_options(s, todo)
    with tqdm(total=len(points), initial=len(points) - len(todo), desc=label, unit="point", file=sys.stderr,
              dynamic_ncols=True) as bar:
        if scale_out is not None:
            todo = _scale_out(ctx, todo, by_hash, scale_out, bar, out)
        for wait in (False, True):   # first what nobody holds, then wait for the rest
            held_elsewhere = []
            for p, may_copy in todo:
                h = p.spec.config_hash()
                with store.claim(h, wait=wait) as mine:
                    if not mine:
                        held_elsewhere.append((p, may_copy))
                        continue
                    bar.set_postfix_str(p.slot)
                    if _written_meanwhile(store, p.slot, h, planned[p.slot]):
                        out.elsewhere.append(p.slot)
                    else:
                        if may_copy and not s.force:   # another run may have computed it for another slot
                            by_hash.update({e.config_hash: e.path for e in store.scan().entries})
                        if may_copy and h in by_hash:
                            store.copy(by_hash[h], p.slot)
                            out.copied.append(p.slot)
                        else:
                            try:
                                by_hash[h] = runners.of(p.spec).run(p.slot, p.spec)
                            except mit.MitFailure as failure:   # a reference that cannot run: the paper goes on
                                _say(str(failure))
                                out.failed.append(p.slot)
                            else:
                                out.computed.append(p.slot)
                    bar.update()
            todo = held_elsewhere
    _report(out, len(points), label)
    return out


class _Runners:
    """The runner of each kind of spec, made on first need: torch and the engines load only when a RunSpec
    must be computed. `runner` (tests) replaces the one for RunSpecs."""

    def __init__(self, ctx: Context, runner=None):
        self.ctx, self.run_runner, self.mit_runner = ctx, runner, None

    def of(self, spec):
        if isinstance(spec, mit.MitSpec):
            self.mit_runner = self.mit_runner or mit.MitRunner(self.ctx.store, self.ctx.settings)
            return self.mit_runner
        if self.run_runner is None:
            from .runner import Runner  # torch and the engines load only when a RunSpec must be computed
            self.run_runner = Runner(self.ctx.store, cpu_threads=self.ctx.settings.cpu_threads)
        return self.run_runner


def _scale_out_options(settings: Settings, todo: list[tuple[Point, bool]]):
    """executors.Options when the RunSpec points go to workers (--workers, --gpus, --executor slurm), else
    None: one worker without GPUs computes in this process, as the loop in `execute` does."""
    if not any(isinstance(p.spec, RunSpec) for p, _ in todo):
        return None
    from . import executors  # submitit, and torch with the engines, only when something must be computed

    opts = executors.options(settings)
    return None if opts.in_process else opts


def _scale_out(ctx: Context, todo: list[tuple[Point, bool]], by_hash: dict, opts, bar: tqdm,
               out: Outcome) -> list[tuple[Point, bool]]:
    """The RunSpec points computed by workers (streamkv/executors.py), each equal spec once: copies of
    existing results first, then the workers (the baseline split over them), then copies of what they made.
    Returns the other points (the MIT reference's), which run in this process."""
    from . import executors, worker

    store, compute, planned, deferred = ctx.store, [], {}, []
    rest = [(p, may_copy) for p, may_copy in todo if not isinstance(p.spec, RunSpec)]
    for p, may_copy in todo:
        if not isinstance(p.spec, RunSpec):
            continue
        h = p.spec.config_hash()
        if may_copy and h in by_hash:
            store.copy(by_hash[h], p.slot)
            out.copied.append(p.slot)
            bar.update()
        elif may_copy and h in planned:
            deferred.append(p)        # an equal spec computed in this run: copied once it lands
        else:
            planned.setdefault(h, p.slot)
            compute.append(p)
            path = store.path(p.slot)
            # A current result to measure again (FORCE, STRICT_BASELINE_CHECK) is removed first, as a rewrite
            # would, so that the workers' "already done" check does not keep it.
            if store.lookup(p.slot, h, allow_stale=False) is not None:
                with store.lock(path):
                    path.unlink()
    units = worker.units_of([(p.slot, p.spec) for p in compute], executors.worker_count(opts, len(compute)))
    executors.run(store, units, opts, bar)
    out.computed += [p.slot for p in compute]
    for p in deferred:
        store.copy(store.path(planned[p.spec.config_hash()]), p.slot)
        out.copied.append(p.slot)
        bar.update()
    return rest


def _report(out: Outcome, total: int, label: str) -> None:
    _say(f"{label}: {total} points: {len(out.reused)} reused, {len(out.copied)} copied from an equal spec, "
         f"{len(out.computed)} computed, {len(out.elsewhere)} computed by a concurrent run, "
         f"{len(out.stale_kept)} stale kept" + (f", {len(out.failed)} failed" if out.failed else ""))
    for slot in out.stale_replaced:
        _say(f"  stale, recomputed: {slot}")
    for slot in out.stale_kept:
        _say(f"  stale, kept (ALLOW_STALE_RESULTS=1; marked in tables): {slot}")


def run_stages(settings: Settings, names, *, runs: int | None = None, profile: Profile | None = None,
               random_weights: bool = False) -> Outcome:
    Store(settings.results_dir).check_writable()   # before anything is tokenized, indexed or computed
    ctx = context(settings, tokenize=True, profile=profile, random_weights=random_weights)
    return execute(ctx, plan(ctx, names, runs=runs), label="+".join(names))


# ----------------------------------------------------------------------------------- tables and status
def tables_spec(ctx: Context) -> tables.TablesSpec:
    """The slots and labels of every table row and figure curve, taken from the plan itself."""
    profile, names = ctx.profile, paper_stages(ctx.settings)

    def lines(points: list[Point]) -> tuple[tables.Line, ...]:
        return tuple(tables.Line(p.display, p.slot, p.value) for p in points)

    baseline = {d.name: lines(plan_baseline(ctx, datasets=(d,)))[0] for d in profile.datasets}
    long = profile.long.name
    return tables.TablesSpec(
        profile=profile.name, model=profile.model_display,
        long=tables.Dataset(long, profile.long.display, profile.long.source, profile.long.cite),
        short=tables.Dataset(profile.short.name, profile.short.display, profile.short.source, profile.short.cite),
        cap_total=profile.cap_total, n_sink=profile.n_sink, lazy_r=profile.lazy_r,
        main=tuple(tables.Block(d.display, baseline[d.name], lines(plan_main(ctx, (d,)))) for d in profile.datasets),
        ablations=tables.Block(None, baseline[long], lines(plan_ablations(ctx))) if "ablations" in names else None,
        sweeps=tuple(tables.Block(SWEEP_SYMBOLS[knob], baseline[long], lines(points), knob)
                     for knob, points in _sweep_points(ctx).items()) if "sweeps" in names else (),
        timing_indicative=not profile.device.startswith("cuda"),
        mit=_mit_comparisons(ctx) if "mit" in names else (),
        engines=tuple(tables.EngineRow(profile.long.display, display, lines(points[:1])[0], lines(points[1:]))
                      for display, points in bench_engine_points(ctx)) if "bench" in names else (),
    )


def _mit_comparisons(ctx: Context) -> tuple[tables.Comparison, ...]:
    """Each MIT reference beside the main point of ours with the same sinks and recent window."""
    ours = {p.slot: tables.Line(p.display, p.slot) for p in plan_main(ctx)}
    return tuple(tables.Comparison(m.dataset.display, tables.Line(m.reference.display, m.slot),
                                   ours[variant_slot("main", m.dataset, m.reference.ours)], m.spec.provenance)
                 for m in ctx.mit())


@dataclass
class TablesReport:
    text: str
    written: list[Path]
    stale: list[str]          # slots whose stale result filled a cell (ALLOW_STALE_RESULTS=1) or was refused
    problems: list[str]       # unreadable result files, skipped


def _reading_context(settings: Settings, profile: Profile | None) -> Context:
    """The context of `tables` and `status`, which only read results: a results directory named explicitly
    must exist (a typo would otherwise read as "nothing computed yet"); the default may be absent."""
    present = Store(settings.results_dir).check_readable(must_exist=Path(settings.results_dir) != default_results_dir())
    ctx = context(settings, tokenize=False, profile=profile)
    if not present:
        _say(f"note: results directory {ctx.store.root} does not exist yet: no point has been computed")
    return ctx


def write_tables(settings: Settings, out_dir: Path, *, profile: Profile | None = None) -> TablesReport:
    """Rewrite NeurIPS/generated/*.tex and the figures from the results; never loads a model."""
    ctx = _reading_context(settings, profile)
    expected = {p.slot: p.spec and p.spec.config_hash() for p in plan(ctx, paper_stages(settings))}

    def lookup(slot: str):
        return ctx.store.lookup(slot, expected.get(slot), settings.allow_stale_results)

    spec = tables_spec(ctx)
    written = tables.write_all(lookup, spec, out_dir) + figures.write_all(lookup, spec, out_dir)
    text = tables.render_text(lookup, spec)
    return TablesReport(text, written, sorted(ctx.store.stale), sorted(ctx.store.problems.values()))


def status(settings: Settings, *, profile: Profile | None = None) -> tuple[list[tuple[str, str, str]], list[str]]:
    """([(slot, state, engine)] for every planned point, problems found in the results directory)."""
    ctx = _reading_context(settings, profile)
    names = paper_stages(settings)
    rows = [(p.slot, classify(ctx, p), p.spec.engine if p.spec else "?") for p in plan(ctx, names)]
    return rows, ctx.store.scan().problems
