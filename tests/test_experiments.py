"""The stage registry (streamkv/experiments) against what else names stages: the Makefile's targets, the
settings' switches, the table generators, the store's layout; and "how to add an engine / a stage / a table"
(docs/ARCHITECTURE.md) done for real: a toy engine, a toy stage and its table, each registered in one line,
run through the CLI on the demo model."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import pytest

from streamkv import code_identity, engines, experiments, plans, settings as settings_mod, tables
from streamkv.profiles import Variant
from streamkv.settings import Settings
from streamkv.store import Store
from streamkv.tables.columns import PPL, headers, trace
from streamkv.tables.layout import INSERT, Entry, Group, Row, Table

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"


def make_targets(text: str) -> dict[str, str]:
    """target -> its recipe (the tab-indented lines below it)."""
    return {m["target"]: m["recipe"] for m in re.finditer(r"^(?P<target>[a-z0-9-]+):[^\n]*\n(?P<recipe>(?:\t[^\n]*\n)*)",
                                                           text, flags=re.M)}


def stage_targets_disagree(text: str) -> list[str]:
    """Stages whose Make target (the stage's name) is missing or does not run the stage's CLI command."""
    targets = make_targets(text)
    return [s.name for s in experiments.STAGES
            if not re.search(rf"\$\(STREAMKV\) {re.escape(s.command)}( |$)", targets.get(s.name, ""), flags=re.M)]


def test_every_stage_has_a_make_target_that_runs_its_command():
    text = MAKEFILE.read_text()
    assert stage_targets_disagree(text) == []
    # The check can fail: a target running another stage's command, or a missing target, is caught.
    assert stage_targets_disagree(text.replace("$(STREAMKV) mit-reference", "$(STREAMKV) bench")) == ["mit"]
    assert stage_targets_disagree(re.sub(r"^sweeps:", "sweep:", text, flags=re.M)) == ["sweeps"]
    phony = re.search(r"^\.PHONY: (.*)$", text, flags=re.M)[1].split()
    assert set(experiments.names()) <= set(phony)


def test_every_switch_is_a_settings_bool_read_from_its_env_knob():
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    for stage in experiments.STAGES:
        if stage.switch is None:
            continue
        assert fields[stage.switch].type == "bool", stage.name
        assert settings_mod.KNOBS[stage.env] == (stage.switch, settings_mod._bool)
        off = settings_mod.load(environ={stage.env: "0"}, dotenv=None)
        assert stage not in experiments.enabled(off)
        on = settings_mod.load(environ={stage.env: "1"}, dotenv=None)
        assert stage in experiments.enabled(on)


def test_every_table_a_stage_feeds_is_generated_and_every_stage_has_its_module():
    generated = {stem for stem, _ in tables.GENERATORS}
    fed = [t for s in experiments.STAGES for t in s.tables]
    assert set(fed) <= generated and len(fed) == len(set(fed))
    for stage in experiments.STAGES:
        assert callable(stage.module.plan) and (not stage.tables or callable(stage.module.rows)), stage.name
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        experiments.get("nope")


def test_every_stage_runner_writes_a_kind_the_store_reads():
    import importlib

    from streamkv import recorder, store

    for stage in experiments.STAGES:
        module = importlib.import_module(stage.runner)
        runners = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, recorder.Recorder)
                   and v is not recorder.Recorder]
        assert callable(module.make) and [r.kind for r in runners] != [], stage.name
        assert {r.kind for r in runners} <= set(store.RESULT_KINDS), stage.name


def test_slot_roots_come_from_the_registry(tmp_path):
    store = Store(tmp_path)
    assert store.path("baselines/pg19") == tmp_path / "baselines" / "pg19_baseline_avg.json"
    assert store.path("mit_bench/pg19_benchmark_recompute") == tmp_path / "mit_bench" / "pg19_benchmark_recompute.json"
    assert store.path("runs/pg19/abc") == tmp_path / "runs" / "pg19" / "abc.json"
    assert store.path("sweeps/pg19/R=4") == tmp_path / "paper_experiments" / "sweeps" / "pg19" / "R=4.json"
    assert experiments.result_directories() == ("baselines", "paper_experiments", "mit_bench", "runs")


# ------------------------------------------------------------------ how to add a stage, how to add a table
TOY_TOKENS = 320   # demo cap 256 + a few prune cycles: seconds on the demo model
TOY = Variant("r2", "Lazy Pruning (R = 2)", knobs=(("compress_every", 2),))


def toy_plan(ctx) -> list:
    """The toy stage's plan: one streaming point on the first TOY_TOKENS tokens of the long stream."""
    return plans.variant_points(ctx, "toy", dataclasses.replace(ctx.profile.long, max_tokens=TOY_TOKENS), (TOY,))


def toy_table(lookup, spec: tables.TablesSpec):
    """The toy table: its stage's rows (Lines) with their perplexity."""
    cells = [(line, lookup(line.slot)) for line in spec.rows.get("toy", ())]
    rows = tuple(Row((Entry(line.display), Entry(INSERT) if cell is None else PPL.compute(cell, None)),
                     trace(line.slot, cell)) for line, cell in cells)
    return Table("toy", "tab:toy", "Toy stage.", *headers("Method", (PPL,)), (Group(None, rows),))


def test_a_stage_and_its_table_registered_in_one_line_each_run_through_the_cli(invoke, monkeypatch, tmp_path):
    """docs/ARCHITECTURE.md, "How to add a stage" and "How to add a table", on the demo model."""
    module = types.ModuleType(f"{experiments.__name__}.toy")   # stands for streamkv/experiments/toy.py
    module.plan, module.rows = toy_plan, lambda ctx: plans.lines(toy_plan(ctx))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(experiments, "STAGES", experiments.STAGES + (
        experiments.Stage("toy", "toy", "A toy stage.", "toy", tables=("toy",)),))      # the stage's line
    monkeypatch.setattr(tables, "GENERATORS", tables.GENERATORS + (("toy", toy_table),))  # the table's line

    quick = {"WARMUP_RUNS": "0", "REPEAT_RUNS": "1"}   # every command plans the same points
    result = invoke("toy", env=quick)
    assert result.exit_code == 0, result.output
    assert "toy: 1 points: 0 reused, 0 copied from an equal spec, 1 computed" in result.stderr
    path = tmp_path / "results" / "paper_experiments" / "toy" / "demo-long" / "r2.json"
    doc = json.loads(path.read_text())
    assert doc["slot"] == "toy/demo-long/r2" and doc["spec"]["policy"]["compress_every"] == 2
    assert doc["spec"]["data"]["n_tokens"] == TOY_TOKENS

    # `tables` plans it without tokenizing (the stream index) and writes its table beside the others.
    result = invoke("tables", "--out-dir", str(tmp_path / "generated"), env=quick)
    assert result.exit_code == 0, result.output
    toy_tex = (tmp_path / "generated" / "toy.tex").read_text()
    assert f"{doc['metrics']['perplexity']:.3f}" in toy_tex and doc["config_hash"] in toy_tex
    result = invoke("status", env=quick)   # `status` lists it too
    assert ["toy/demo-long/r2", "current", "parallel"] in [line.split() for line in result.stdout.splitlines()]


def test_an_engine_registered_in_one_line_runs_through_the_cli(invoke, monkeypatch, tmp_path):
    """docs/ARCHITECTURE.md, "How to add an engine": a module with `evaluate` (here the reference engine's,
    under another name) and one REGISTRY line; `run --engine toy` scores what `--engine reference` scores."""
    name = f"{engines.__name__}.toy"    # stands for streamkv/engines/toy.py, written outside the checkout
    source = tmp_path / "toy.py"
    source.write_text("from streamkv.engines.reference import evaluate  # noqa: F401\n")
    loaded = importlib.util.spec_from_file_location(name, source)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, name, module)
    path_of = code_identity._path   # its code identity is read from its file, as for a module in the package
    monkeypatch.setattr(code_identity, "_path", lambda m: source if m == name else path_of(m))
    monkeypatch.setattr(code_identity, "_modules", {})
    monkeypatch.setitem(engines.REGISTRY, "toy", engines.Engine("toy", self_timed=False))   # the engine's line

    docs = {}
    for engine in ("toy", "reference"):
        result = invoke("run", "--engine", engine, "--cap-total", "32", "--max-eval-tokens", "80",
                        "--warmup-runs", "0", "--repeat-runs", "1", "--output", f"{engine}.json")
        assert result.exit_code == 0, result.output
        docs[engine] = json.loads((tmp_path / f"{engine}.json").read_text())
    toy, reference = docs["toy"], docs["reference"]
    assert toy["spec"]["engine"] == "toy" and toy["config_hash"] != reference["config_hash"]
    assert toy["metrics"]["perplexity"] == reference["metrics"]["perplexity"]
    assert (tmp_path / toy["artifacts"]["nll"]).read_bytes() == (tmp_path / reference["artifacts"]["nll"]).read_bytes()
