"""Hostile and bad input: checkpoints that ship code, hostile result JSON, bad command lines and foreign
working directories.

What must hold: no checkpoint code runs, a hostile result is reported and never rendered, and every failure
is one `streamkv: error: ...` line with exit code 2. (Disks that fail, kill -9 and concurrent runs:
tests/test_faults.py.)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamkv import assets, context, files, plans, reports, stages
from streamkv.assets import AssetError
from streamkv.spec import ModelSpec

from conftest import FakeRunner, assert_one_line_error


# ------------------------------------------------------------------------------------ hostile checkpoints
EVIL = "import pathlib; pathlib.Path({marker!r}).write_text('ran')\n"


@pytest.fixture
def hostile_checkpoint(tmp_path):
    """A checkpoint whose config and tokenizer config map classes to its own Python files, each of which
    leaves a marker file when imported."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (folder / f"{module}.py").write_text(EVIL.format(marker=str(marker)))
    (folder / "model.safetensors").write_bytes(b"not weights")
    return folder, marker


@pytest.mark.parametrize("loader", [assets.load_config, assets.load_tokenizer, assets.load_model])
@pytest.mark.parametrize("precheck", [True, False])
def test_a_checkpoint_that_ships_code_is_refused_and_nothing_runs(hostile_checkpoint, monkeypatch, loader, precheck):
    folder, marker = hostile_checkpoint
    spec = ModelSpec(name=str(folder), revision=files.sha256_file(folder / "model.safetensors"), dtype="float32")
    if not precheck:   # the second line of defence: transformers itself, told trust_remote_code=False
        monkeypatch.setattr(assets, "refuse_remote_code", lambda folder, name: None)
    with pytest.raises(AssetError) as err:
        loader(spec)
    assert "\n" not in str(err.value) and not marker.exists()
    if precheck:
        assert "ships its own Python code" in str(err.value) and "trust_remote_code=False" in str(err.value)


def test_the_cli_refuses_a_hostile_model_name_in_one_line(invoke, hostile_checkpoint, tmp_path):
    folder, marker = hostile_checkpoint
    stream = assets.REPO / assets.DEMO_STREAMS["demo-short"]
    result = invoke("run", "--profile", "paper", "--dataset", "pg19",
                    env={"MODEL_NAME": str(folder), "PG19_SAMPLE_FILE": str(stream)})
    assert_one_line_error(result, "ships its own Python code", tmp_path / "results")
    assert not marker.exists()


# ----------------------------------------------------------------------------------- hostile result JSON
HOSTILE = {
    "main/long/lazy": {"metrics": {"perplexity": "12.5"}},                       # a string perplexity
    "main/long/strict": {"metrics": None},                                       # null metrics
    "main/short/lazy": {"metrics": {"perplexity": None}},                        # no perplexity
    "main/short/strict": {"metrics": {"perplexity": 9.0, "n_predicted_tokens": True}},   # a bool count
    "baselines/long": {"artifacts": {"nll": "../../../../etc/passwd"}},          # an artifact outside
    "baselines/short": {"config_hash": "not-a-hash"},
}


def test_hostile_result_json_is_reported_never_rendered_and_recomputed(fakes):
    profile, settings = fakes
    ctx = context.context(settings(), tokenize=True, profile=profile)
    points = plans.plan(ctx, ["main"])
    stages.execute(ctx, points, runner=FakeRunner(ctx.store))
    for slot, change in HOSTILE.items():
        path = ctx.store.path(slot)
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    report = reports.write_tables(settings(), ctx.store.root / "gen", profile=profile)   # `make tex`
    assert len(report.problems) == len(HOSTILE) and all("invalid result" in p for p in report.problems)
    assert "12.5" not in report.text and "[INSERT DATA]" in report.text
    runner = FakeRunner(ctx.store)
    stages.execute(ctx, plans.plan(ctx, ["main"]), runner=runner)             # `make main`
    assert sorted(runner.computed) == sorted(HOSTILE)
    assert reports.write_tables(settings(), ctx.store.root / "gen", profile=profile).problems == []


# ---------------------------------------------------------------------------------- bad command lines
def _not_utf8(tmp_path: Path) -> dict:
    (tmp_path / ".env").write_bytes(b"CAP_TOTAL=256\nMIT_REPO=caf\xe9\n")
    return {}


def _results_file(tmp_path: Path) -> dict:
    (tmp_path / "afile").write_text("x")
    return {"RESULTS_DIR": str(tmp_path / "afile")}


def _out_dir_file(tmp_path: Path) -> dict:
    (tmp_path / "results").mkdir()
    (tmp_path / "afile").write_text("x")
    return {}


BAD = [  # (command line, environment set-up, message)
    (["main"], _results_file, "is not a directory"),
    (["status"], _results_file, "is not a directory"),
    (["tables"], _results_file, "is not a directory"),
    (["status", "--results-dir", "absent"], None, "does not exist"),
    (["tables", "--results-dir", "absent"], None, "does not exist"),
    (["tables", "--out-dir", "afile"], _out_dir_file, "afile"),
    (["pdf", "--neurips-dir", "absent"], None, "not found"),
    (["status"], _not_utf8, "not UTF-8 text (byte 0xe9"),
    (["main", "--results-dir", ""], None, "RESULTS_DIR / --results-dir is empty"),
    (["run", "--results-dir", ""], None, "RESULTS_DIR / --results-dir is empty"),
    (["run", "--mode", "baseline", "--window-size", "0"], None, "window must be > 0"),
    (["baseline", "--runs", "0"], None, "0 is not in the range x>=1"),
    (["run", "--cap-total", str(10 ** 30)], None, "covers all"),
    (["main", "--cap-total", "64"], None, "covers all 64 tokens of long"),
]


@pytest.mark.parametrize("args, setup, message", BAD)
def test_bad_inputs_end_in_one_line(invoke, faked, tmp_path, args, setup, message):
    env = setup(tmp_path) if setup else {}
    result = invoke(*args, env=env)
    assert_one_line_error(result, message, tmp_path / "results")
    assert faked == [] or faked[-1].computed == []


def test_status_and_tables_on_the_default_results_dir_say_it_is_absent(invoke, faked, tmp_path):
    for command in ("status", "tables"):
        result = invoke(command)
        assert result.exit_code == 0, result.output
        assert f"note: results directory {tmp_path / 'results'} does not exist yet" in result.stderr


def test_a_broken_stream_index_is_named(invoke, faked, tmp_path):
    assert invoke("main").exit_code == 0
    index = tmp_path / "results" / "streams" / "long.json"
    index.write_text(index.read_text()[:20])   # truncated
    result = invoke("status")
    assert result.exit_code == 0 and f"stream index {index} is unreadable" in result.stderr


# ------------------------------------------------------------------------------------ working directory
def test_the_working_directory_changes_no_path(invoke, faked, tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("REPEAT_RUNS=2\n")
    elsewhere = tmp_path / "NeurIPS"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert invoke("main").exit_code == 0 and invoke("tables").exit_code == 0
    assert (tmp_path / "results" / "baselines" / "long_baseline_avg.json").is_file()
    assert (tmp_path / "NeurIPS" / "generated" / "tables.tex").is_file()
    assert not (elsewhere / "results").exists() and not (elsewhere / "NeurIPS").exists()
    lazy = json.loads((tmp_path / "results" / "paper_experiments" / "main" / "long" / "lazy.json").read_text())
    assert lazy["spec"]["measure"]["repeat_runs"] == 2   # the root's .env, read from a subdirectory
