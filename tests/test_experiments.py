"""The stage registry (streamkv/experiments) against what else names stages: the Makefile's targets, the
settings' switches, the table generators, the store's layout; and "how to add a stage / a table"
(docs/ARCHITECTURE.md) done for real: a toy stage and its table, registered in one line each, run through
the CLI on the tiny model."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from streamkv import experiments, settings as settings_mod, tables
from streamkv.settings import Settings
from streamkv.store import Store

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


def test_slot_roots_come_from_the_registry(tmp_path):
    store = Store(tmp_path)
    assert store.path("baselines/pg19") == tmp_path / "baselines" / "pg19_baseline_avg.json"
    assert store.path("mit_bench/pg19_benchmark_recompute") == tmp_path / "mit_bench" / "pg19_benchmark_recompute.json"
    assert store.path("runs/pg19/abc") == tmp_path / "runs" / "pg19" / "abc.json"
    assert store.path("sweeps/pg19/R=4") == tmp_path / "paper_experiments" / "sweeps" / "pg19" / "R=4.json"
    assert experiments.result_directories() == ("baselines", "paper_experiments", "mit_bench", "runs")
