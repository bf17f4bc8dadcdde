"""Stages: plans, reuse / stale / copy rules, baseline reuse, kill -9 resume, tables, status.
The runner (one point on the real engines) is tested in test_runner.py, the profiles in test_profiles.py."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from streamkv import assets, context, engines, plans, reports, shards, stages, worker
from streamkv.engines.contiguous import Unsupported
from streamkv.policies import PolicySpec, build_schedule
from streamkv.runspec import RunSpec
from streamkv.spec import DataSpec, ModelSpec
from streamkv.store import Store

from conftest import N_TOKENS, FakeRunner, edit_engine

TESTS = Path(__file__).resolve().parent


def points_of(profile, settings, names, **kw):
    ctx = context.context(settings, tokenize=True, profile=profile)
    return ctx, plans.plan(ctx, names, **kw)


def run(profile, settings, names, runner_factory=FakeRunner, **kw):
    ctx = context.context(settings, tokenize=True, profile=profile)
    runner = runner_factory(ctx.store)
    outcome = stages.execute(ctx, plans.plan(ctx, names, **kw), runner=runner)
    return runner, outcome


# ----------------------------------------------------------------------------------------------- plans
def test_plans_name_their_slots(fakes):
    profile, settings = fakes
    _, main = points_of(profile, settings(), ["main"])
    assert [p.slot for p in main] == ["baselines/long", "baselines/short", "main/long/strict", "main/long/lazy",
                                      "main/short/strict", "main/short/lazy"]
    _, sweeps = points_of(profile, settings(), ["sweeps"])
    assert [p.slot for p in sweeps] == ["baselines/long", "sweeps/long/R=1", "sweeps/long/R=2", "sweeps/long/R=4"]
    _, quality = points_of(profile, settings(run_quality_heuristics=True), ["ablations", "sweeps"])
    assert [p.slot for p in quality if p.slot.startswith("ablations")][-2:] == [
        "ablations/long/lazy_slack", "ablations/long/lazy_slack_maxdrop"]
    assert [p.slot for p in quality if "sigma" in p.slot or "delta" in p.slot] == [
        "sweeps/long/sigma=0", "sweeps/long/sigma=2", "sweeps/long/delta=0", "sweeps/long/delta=2"]
    assert plans.paper_stages(settings(run_sweeps=False, run_ablations=False, run_mit_bench=False)) == ("baseline", "main")


def test_specs_carry_the_knobs(fakes):
    profile, settings = fakes
    _, points = points_of(profile, settings(warmup_runs=1, repeat_runs=3), ["main"])
    spec = {p.slot: p.spec for p in points}
    base, lazy_spec = spec["baselines/long"], spec["main/long/lazy"]
    assert (base.mode, base.engine, base.policy.cap_total, base.measure.repeat_runs) == ("baseline", "recompute", 16, 1)
    assert (lazy_spec.policy.compress_every, lazy_spec.policy.window, lazy_spec.engine) == (4, 14, "decode")
    # Perplexity from decode, timed by the fastest exact engine that supports the point (fast).
    assert (lazy_spec.measure.warmup_runs, lazy_spec.measure.repeat_runs, lazy_spec.measure.timing_tokens,
            lazy_spec.measure.timing_engine) == (1, 3, 8, "fast")
    assert lazy_spec.data.n_tokens == 64 and spec["main/short/lazy"].data.n_tokens == 32


def test_perplexity_and_timing_engines_are_recorded(fakes):
    profile, settings = fakes
    profile = dataclasses.replace(profile, perplexity_engine="parallel")
    _, points = points_of(profile, settings(), ["ablations"])
    engine = {p.slot.rsplit("/", 1)[1]: (p.spec.engine, p.spec.measure.timing_engine, p.spec.measure.timing_tokens)
              for p in points}
    assert engine["lazy"] == engine["lazy_absolute"] == ("parallel", "fast", 8)
    # Only decoding has the fp16 drift: its perplexity comes a forward per prune period, its timing from
    # decoding the same prefix as every other point's; so do the score policies'.
    assert engine["lazy_composed_fp16"] == engine["h2o"] == engine["tova"] == ("periods", "decode", 8)


def test_cuda_profiles_always_warm_up(fakes):
    profile, settings = fakes
    _, points = points_of(dataclasses.replace(profile, device="cuda"), settings(warmup_runs=0), ["main"])
    assert {p.spec.measure.warmup_runs for p in points if p.spec.mode == "streaming"} == {1}


@pytest.mark.parametrize("name", ["parallel", "fast"])
def test_engine_declarations_match_what_the_engines_refuse(name):
    """The registry's torch-free supports() (what planning reads) against the engine's own refusal."""
    contiguous = PolicySpec(n_sink=2, window=6, compress_every=2)
    refresh = PolicySpec(n_sink=2, window=4, refresh_budget=2, refresh_policy="uniform", compress_every=2)
    data = DataSpec(name="x", path="x", sha256="0" * 64, n_tokens=24)
    model = ModelSpec(name="m", revision="0" * 40, dtype="float32")
    for policy in (contiguous, refresh):
        for mode, rerotation in (("cache", "exact"), ("cache", "composed_fp16"), ("absolute", "exact")):
            draft = RunSpec(model=model, data=data, mode="streaming", policy=policy, position_mode=mode,
                            rerotation=rerotation, engine="decode")
            schedule = build_schedule(policy, 24)
            # A model-less call: an unsupported point is refused before the model is touched.
            try:
                engines.get(name).function(None, torch.arange(24), schedule, position_mode=mode, rerotation=rerotation)
                refused = False
            except Unsupported:
                refused = True
            except AttributeError:
                refused = False
            assert refused is (engines.get(name).supports(draft) is not None), (policy, mode, rerotation)


# ------------------------------------------------------------------------------------- execution rules
def test_results_are_reused_on_an_equal_hash(fakes):
    profile, settings = fakes
    first, outcome = run(profile, settings(), ["main"])
    assert sorted(first.computed) == sorted(outcome.computed) and len(first.computed) == 6
    second, outcome = run(profile, settings(), ["main"])
    assert second.computed == [] and len(outcome.reused) == 6


def test_equal_specs_in_other_slots_are_copied_not_recomputed(fakes):
    profile, settings = fakes
    run(profile, settings(), ["main"])
    runner, outcome = run(profile, settings(), ["sweeps"])
    assert runner.computed == ["sweeps/long/R=2"]
    assert outcome.copied == ["sweeps/long/R=1", "sweeps/long/R=4"]   # = main strict and main lazy


def test_a_bench_point_equal_to_the_baseline_is_copied_not_recomputed(fakes):
    """Bench points are ordinary points of the one loop: an equal spec is the same experiment."""
    profile, settings = fakes
    run(profile, settings(), ["baseline"])
    # One timed run and no warm-up, as the baseline takes them: the same experiment in every knob.
    whole_stream = settings(mit_bench_gen_tokens=N_TOKENS["long"] - profile.cap_total - 1, warmup_runs=0,
                            repeat_runs=1)
    runner, outcome = run(profile, whole_stream, ["bench"])
    # Both streams are no longer than C + N + 1 tokens: each bench recompute point is its baseline.
    assert outcome.copied == ["mit_bench/long_benchmark_recompute", "mit_bench/short_benchmark_recompute"]
    assert not any(slot.endswith("recompute") for slot in runner.computed) and len(runner.computed) == 8   # 4 streaming, 4 engine comparison


def test_tables_find_stream_specs_when_the_stream_file_is_gone(fakes, tmp_path):
    """A reviewer's machine may hold results/ but not the paper's stream files: `make tex` still fills cells."""
    profile, settings = fakes
    run(profile, settings(), ["main"])
    for dataset in profile.datasets:
        (Path(dataset.path) if Path(dataset.path).is_absolute() else assets.REPO / dataset.path).unlink()
    report = reports.write_tables(settings(), tmp_path / "generated", profile=profile)
    assert report.stale == [] and "[INSERT DATA]" not in (tmp_path / "generated" / "tables.tex").read_text()


def test_a_changed_knob_makes_results_stale_and_they_are_recomputed_and_listed(fakes, capsys):
    profile, settings = fakes
    run(profile, settings(), ["main"])
    runner, outcome = run(profile, settings(repeat_runs=2), ["main"])
    streaming = ["main/long/strict", "main/long/lazy", "main/short/strict", "main/short/lazy"]
    assert runner.computed == streaming and outcome.stale_replaced == streaming
    assert outcome.reused == ["baselines/long", "baselines/short"]  # the baseline is fixed, not re-timed
    assert "stale, recomputed: main/long/lazy" in capsys.readouterr().err


def test_an_edited_engine_makes_exactly_its_points_stale_and_tables_mark_them(fakes, tmp_path, monkeypatch):
    """Issue 10: a result made by other code is never served as current."""
    profile, settings = fakes
    profile = dataclasses.replace(profile, perplexity_engine="parallel")
    run(profile, settings(), ["main"])
    streaming = ["main/long/strict", "main/long/lazy", "main/short/strict", "main/short/lazy"]
    edit_engine(monkeypatch, "parallel")
    out = tmp_path / "generated"
    report = reports.write_tables(settings(allow_stale_results=True), out, profile=profile)
    assert report.stale == sorted(streaming)
    dagger = [line for line in (out / "tables.tex").read_text().splitlines() if "dagger" in line and "&" in line]
    assert [line.split(" & ")[0] for line in dagger] == ["Start+Recent (R = 1)$^{\\dagger}$",
                                                        "Lazy Pruning (R = 4)$^{\\dagger}$"] * 2
    runner, outcome = run(profile, settings(), ["main"])
    assert runner.computed == streaming and outcome.stale_replaced == streaming
    assert outcome.reused == ["baselines/long", "baselines/short"]
    edit_engine(monkeypatch, "recompute")
    runner, _ = run(profile, settings(), ["main"])
    assert runner.computed == ["baselines/long", "baselines/short"]


def test_allow_stale_keeps_stale_results_but_lists_them(fakes, capsys):
    profile, settings = fakes
    run(profile, settings(), ["main"])
    runner, outcome = run(profile, settings(repeat_runs=2, allow_stale_results=True), ["main"])
    assert runner.computed == [] and len(outcome.stale_kept) == 4
    assert "stale, kept (ALLOW_STALE_RESULTS=1; marked in tables): main/short/lazy" in capsys.readouterr().err


def test_force_recomputes_everything_once(fakes):
    profile, settings = fakes
    run(profile, settings(), ["main", "sweeps"])
    runner, outcome = run(profile, settings(force=True), ["main", "sweeps"])
    assert len(runner.computed) == 7 and len(outcome.copied) == 2 and outcome.reused == []


def test_corrupt_and_foreign_results_are_reported_and_recomputed(fakes, capsys):
    profile, settings = fakes
    run(profile, settings(), ["main"])
    root = Path(settings().results_dir)
    (root / "paper_experiments" / "main" / "long" / "lazy.json").write_text('{"schema_version": 1, "ki')
    (root / "baselines" / "short_baseline_avg.json").write_text(json.dumps({"schema_version": 0, "kind": "seed"}))
    capsys.readouterr()
    runner, _ = run(profile, settings(), ["main"])
    err = capsys.readouterr().err
    assert "lazy.json: corrupt JSON" in err and "short_baseline_avg.json: foreign JSON" in err
    assert runner.computed == ["baselines/short", "main/long/lazy"]
    assert Store(root).scan().problems == []


def test_a_result_another_run_writes_while_this_one_classifies_counts_as_theirs(fakes, monkeypatch):
    """The race window between classifying a slot and taking its file identity: a result written there by
    another run is theirs (computed elsewhere), not computed again, and not copied onto itself."""
    profile, settings = fakes
    ctx, points = points_of(profile, settings(), ["main"])
    target = next(p for p in points if p.slot == "main/long/lazy")
    classify = stages.classify

    def classify_while_another_run_writes(ctx, point):
        state = classify(ctx, point)
        if point.slot == target.slot:
            FakeRunner(Store(ctx.store.root)).run(point.slot, point.spec)   # the other run, just then
        return state
    monkeypatch.setattr(stages, "classify", classify_while_another_run_writes)
    runner = FakeRunner(ctx.store)
    outcome = stages.execute(ctx, points, runner=runner)
    assert outcome.elsewhere == [target.slot]
    assert target.slot not in outcome.copied + runner.computed
    assert sorted(runner.computed) == sorted(p.slot for p in points if p.slot != target.slot)


# ------------------------------------------------------------------------------------------ baseline
def test_baseline_runs_flag_and_reuse(fakes):
    profile, settings = fakes
    runner, _ = run(profile, settings(), ["baseline"], runs=3)
    assert runner.computed == ["baselines/long", "baselines/short"]
    stored = json.loads(Path(settings().results_dir, "baselines", "long_baseline_avg.json").read_text())
    assert stored["spec"]["measure"]["repeat_runs"] == 3 and len(stored["artifacts"]["repeats"]) == 3
    runner, outcome = run(profile, settings(), ["main"])   # without --runs: the stored baseline is the one
    assert "baselines/long" in outcome.reused and not any(s.startswith("baselines") for s in runner.computed)
    runner, _ = run(profile, settings(), ["baseline"], runs=1)   # an explicit count that differs: re-run
    assert runner.computed == ["baselines/long", "baselines/short"]


def fingerprinted(gpu: str, dtype: str):
    def factory(store):
        return FakeRunner(store, fingerprint={"gpu_name": gpu, "torch": "2.13.0", "cuda": None,
                                              "transformers": "5.24.0", "dtype": dtype})
    return factory


def test_baseline_from_another_gpu_warns_or_reruns_under_strict_check(fakes, capsys):
    profile, settings = fakes
    run(profile, settings(), ["baseline"], runner_factory=fingerprinted("NVIDIA A800", "torch.float32"))
    capsys.readouterr()
    runner, _ = run(profile, settings(), ["main"])
    err = capsys.readouterr().err
    assert "warning: baselines/long was measured in another environment (gpu_name: NVIDIA A800 vs None)" in err
    assert not any(s.startswith("baselines") for s in runner.computed)
    runner, _ = run(profile, settings(strict_baseline_check=True), ["main"])
    assert runner.computed[:2] == ["baselines/long", "baselines/short"]


def test_baseline_dtype_spelled_differently_is_not_a_mismatch(fakes, capsys):
    profile, settings = fakes
    run(profile, settings(), ["baseline"], runner_factory=fingerprinted(None, "torch.float32"))
    capsys.readouterr()
    runner, _ = run(profile, settings(strict_baseline_check=True), ["main"])
    assert "warning" not in capsys.readouterr().err
    assert not any(s.startswith("baselines") for s in runner.computed)


def test_missing_baseline_is_generated_or_refused(fakes):
    profile, settings = fakes
    with pytest.raises(context.StageError, match="AUTO_BASELINE=0"):
        run(profile, settings(auto_baseline=False), ["main"])
    assert not Path(settings().results_dir, "paper_experiments").exists()   # refused before computing
    runner, _ = run(profile, settings(), ["ablations"])                     # AUTO_BASELINE=1 (default)
    assert runner.computed[0] == "baselines/long" and "baselines/short" not in runner.computed
    runner, _ = run(profile, settings(auto_baseline=False), ["ablations"])
    assert runner.computed == []


# ----------------------------------------------------------------------------------------- kill -9
def test_kill_9_then_resume_recomputes_only_unfinished_points(tmp_path, fakes):
    profile, settings = fakes   # same tmp_path, so the worker sees the same streams and results
    log = tmp_path / "worker.log"
    with open(log, "w") as stderr:
        # PYTHONPATH: the checkout's streamkv, whether or not this interpreter has it installed.
        worker = subprocess.Popen([sys.executable, str(TESTS / "conftest.py"), str(tmp_path), "0.15"],
                                  cwd=TESTS.parent, env={**os.environ, "PYTHONPATH": str(TESTS.parent)},
                                  stdout=subprocess.PIPE, stderr=stderr, text=True)
    done = []
    try:
        while len(done) < 3:
            line = worker.stdout.readline()
            assert line, f"the worker ended before it was killed: {log.read_text()[-2000:]}"
            done.append(line.split()[1])
        time.sleep(0.07)   # land the kill inside the next point, not between two
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.wait()
    assert worker.returncode == -signal.SIGKILL
    ctx = context.context(settings(), tokenize=True, profile=profile)
    assert ctx.store.scan().problems == []
    points = plans.plan(ctx, plans.paper_stages(settings()))
    finished = {p.slot for p in points if context.classify(ctx, p) == "current"}
    assert set(done) <= finished and len(finished) < len(points)
    runner = FakeRunner(ctx.store)
    outcome = stages.execute(ctx, points, runner=runner)
    redone = set(runner.computed) | set(outcome.copied)
    assert redone == {p.slot for p in points} - finished
    assert ctx.store.scan().problems == [] and len(ctx.store.scan().entries) == len(points)


# ------------------------------------------------------------------------------------ tables, status
def test_tables_use_the_stream_index_and_mark_stale_results(fakes, tmp_path, monkeypatch):
    profile, settings = fakes
    run(profile, settings(), ["main"])
    run(profile, settings(repeat_runs=2), ["ablations"])   # ablations/long/strict and lazy hash differently

    def no_tokenizer(spec):
        raise AssertionError("the tables stage must not tokenize")

    monkeypatch.setattr(assets, "load_tokenizer", no_tokenizer)
    out = tmp_path / "generated"
    report = reports.write_tables(settings(), out, profile=profile)
    # The R-sweep figure has no results to be drawn from, so it is not there.
    assert {p.name for p in report.written} == {"tables.tex", "ablations.tex", "sweeps.tex",
                                                "negative_results.tex", "engines.tex", "meta.tex", "fig_cache_len.pdf"}
    main_tex = (out / "tables.tex").read_text()
    assert "[INSERT DATA]" not in main_tex and "14.000" in main_tex   # the fake lazy point's PPL (10 + R)
    stale = {"ablations/long/lazy", "ablations/long/lazy_absolute", "ablations/long/lazy_composed_fp16",
             "ablations/long/lazy_no_sink", "ablations/long/lazy_window_matched", "ablations/long/strict",
             "ablations/long/h2o", "ablations/long/tova"}
    assert set(report.stale) == stale
    assert "[INSERT DATA]" in (out / "ablations.tex").read_text()      # refused: ALLOW_STALE_RESULTS=0
    report = reports.write_tables(settings(allow_stale_results=True), out, profile=profile)
    assert "dagger" in (out / "ablations.tex").read_text() and "†" in report.text


def test_status_lists_every_planned_point(fakes, tmp_path):
    profile, settings = fakes
    rows, problems = reports.status(settings(), profile=profile)
    assert {state for _, state, _ in rows} == {"unknown"}        # no stream tokenized yet
    run(profile, settings(), ["main"])
    Path(settings().results_dir, "paper_experiments", "bad.json").write_text("{")
    rows, problems = reports.status(settings(), profile=profile)
    state = {slot: s for slot, s, _ in rows}
    assert state["main/long/lazy"] == "current" and state["sweeps/long/R=2"] == "missing"
    assert len(rows) == 2 + 4 + 8 + 3 + 6 + 4 and len(problems) == 1   # ..., bench: 6 per-dataset, 4 engine comparison
    rows, _ = reports.status(settings(repeat_runs=5), profile=profile)   # 3 is the default now
    assert dict((slot, s) for slot, s, _ in rows)["main/long/lazy"] == "stale"


def test_a_changed_tokenizer_invalidates_the_stream_index(fakes, monkeypatch):
    profile, settings = fakes
    ctx, _ = points_of(profile, settings(), ["main"])
    before = ctx.data(profile.long)
    monkeypatch.setattr(assets, "tokenizer_sha256", lambda spec: "0" * 64)
    calls = []
    monkeypatch.setattr(assets, "load_stream", lambda *a: calls.append(a) or (None, before))
    points_of(profile, settings(), ["main"])
    assert calls, "the index entry made with the old tokenizer was reused"


def test_equal_specs_become_one_unit_whose_other_slots_are_its_copies(fakes):
    """worker.units_of: each distinct spec is computed once, whatever executor runs it; R = 4 of the sweep
    is the main lazy point, so it is that unit's copy, and the split baseline's ranges all carry it."""
    profile, settings = fakes
    _, points = points_of(profile, settings(), ["main", "sweeps"])
    todo = [worker.Unit(p.slot, p.spec) for p in points]
    units = worker.units_of(todo, split=1)
    assert len(units) == len({p.spec.config_hash() for p in points}) == len(points) - 2
    lazy = next(u for u in units if u.slot == "main/long/lazy")
    assert lazy.copies == (("sweeps/long/R=4", None),) and lazy.slots == ("main/long/lazy", "sweeps/long/R=4")
    bench_like = dataclasses.replace(todo[0], slot="mit_bench/long_benchmark_recompute")   # = baselines/long
    split = [u for u in worker.units_of([todo[0], bench_like], split=2)]
    assert len(split) == 2 and {u.part for u in split} == set(split[0].ranges)
    assert all(u.copies == (("mit_bench/long_benchmark_recompute", None),) for u in split)
    # A batched baseline is cut at its batch boundaries (shards.ranges), so no part forwards another's batch.
    batched = dataclasses.replace(todo[0], spec=dataclasses.replace(todo[0].spec, recompute_batch=5))
    spec = batched.spec
    assert worker.units_of([batched], split=2)[0].ranges == \
        tuple(shards.ranges(spec.data.n_tokens, spec.policy.cap_total, 2, 5)) != split[0].ranges
