"""Knobs: .env parsing (never executed), typed values, precedence, one-line errors."""
from __future__ import annotations

import os

import pytest

from streamkv import settings
from streamkv.settings import SettingsError


def load(tmp_path, dotenv: str | None = None, environ: dict | None = None, **overrides):
    path = tmp_path / ".env"
    if dotenv is not None:
        path.write_text(dotenv)
    return settings.load(environ=environ or {}, dotenv=path, overrides=overrides)


def test_defaults_follow_the_guide_except_stale_results_and_timing(tmp_path):
    s = load(tmp_path)
    assert (s.profile, s.run_sweeps, s.run_ablations) == ("demo", True, True)
    assert (s.warmup_runs, s.repeat_runs) == (1, 3)  # deliberate: the guide's stable setting, not its 0, 1
    assert (s.run_quality_heuristics, s.strict_baseline_check, s.auto_baseline) == (False, False, True)
    assert (s.run_mit_reference, s.run_mit_bench, s.mit_bench_gen_tokens) == (False, True, 512)  # bench on: the engine comparison
    assert s.allow_stale_results is False  # deliberate: the seed's default 1 mixed stale rows into tables
    assert s.cap_total is None and s.sweep_r_values is None  # the profile decides
    assert s.results_dir == str(settings.ROOT / "results") and s.force is False


def test_every_knob_of_the_guide_is_read():
    guide = {"CAP_TOTAL", "WARMUP_RUNS", "REPEAT_RUNS", "RUN_SWEEPS", "RUN_ABLATIONS", "RUN_QUALITY_HEURISTICS",
             "SWEEP_R_VALUES", "SWEEP_SIGMA_VALUES", "SWEEP_DELTA_VALUES", "ALLOW_STALE_RESULTS",
             "STRICT_BASELINE_CHECK", "AUTO_BASELINE", "RUN_MIT_REFERENCE", "RUN_MIT_BENCH",
             "MIT_BENCH_GEN_TOKENS", "MIT_REPO", "BASELINE_SINK", "BASELINE_WINDOW", "MODEL_NAME", "PYTHON_BIN",
             "HF_HOME", "PG19_SAMPLE_FILE", "PG19_SAMPLE_LENGTH", "WIKITEXT_SAMPLE_LENGTH", "FORCE",
             "STREAMKV_PROFILE", "RESULTS_DIR"}
    assert guide <= set(settings.KNOBS)


def test_dotenv_as_the_guide_writes_it(tmp_path):
    s = load(tmp_path, """
# comment line
export PYTHON_BIN=kvpress/.venv/bin/python
MODEL_NAME="EleutherAI/pythia-2.8b"
HF_HOME=$PWD/.cache/huggingface
HF_DATASETS_CACHE=$HF_HOME/datasets
HF_HUB_OFFLINE=1
PG19_SAMPLE_FILE='data/pg19/long_context_50000.json'   # pinned sample
SWEEP_R_VALUES="1 16 32 64"
REPEAT_RUNS=3 # inline comment
""", environ={"PWD": "/repo"})
    assert s.python_bin == "kvpress/.venv/bin/python"
    assert s.model_name == "EleutherAI/pythia-2.8b"
    assert s.hf_home == "/repo/.cache/huggingface"
    assert s.pg19_sample_file == "data/pg19/long_context_50000.json"
    assert s.sweep_r_values == (1, 16, 32, 64)
    assert s.repeat_runs == 3


def test_pwd_falls_back_to_the_working_directory(tmp_path):
    assert load(tmp_path, "HF_HOME=${PWD}/hf\n").hf_home == f"{os.getcwd()}/hf"


def test_precedence_flags_over_environment_over_dotenv(tmp_path):
    dotenv = "REPEAT_RUNS=2\nWARMUP_RUNS=1\nCAP_TOTAL=512\n"
    s = load(tmp_path, dotenv, environ={"REPEAT_RUNS": "5", "CAP_TOTAL": "1024"}, cap_total=300)
    assert (s.warmup_runs, s.repeat_runs, s.cap_total) == (1, 5, 300)
    # A flag not given (None) leaves the lower layers alone.
    assert load(tmp_path, dotenv, repeat_runs=None).repeat_runs == 2


def test_empty_value_means_unset(tmp_path):
    assert load(tmp_path, "MIT_REPO=\nREPEAT_RUNS=\n").mit_repo is None
    assert load(tmp_path, environ={"REPEAT_RUNS": " "}).repeat_runs == settings.Settings().repeat_runs == 3


@pytest.mark.parametrize("line", ["X=$(touch {pwned})", "X=`touch {pwned}`", 'X="$(touch {pwned})"'])
def test_dotenv_is_never_executed(tmp_path, line):
    pwned = tmp_path / "pwned"
    with pytest.raises(SettingsError, match="never run as shell"):
        load(tmp_path, line.format(pwned=pwned) + "\n")
    assert not pwned.exists()


def test_single_quotes_are_literal(tmp_path):
    pwned = tmp_path / "pwned"
    s = load(tmp_path, f"MIT_REPO='$(touch {pwned})'\n")
    assert s.mit_repo == f"$(touch {pwned})" and not pwned.exists()


@pytest.mark.parametrize("dotenv, message", [
    ("REPEAT_RUNS=0\n", "REPEAT_RUNS must be >= 1, got 0"),
    ("WARMUP_RUNS=-1\n", "WARMUP_RUNS must be >= 0"),
    ("CAP_TOTAL=lots\n", "CAP_TOTAL must be an integer, got 'lots'"),
    ("RUN_SWEEPS=maybe\n", "RUN_SWEEPS must be 0 or 1, got 'maybe'"),
    ("SWEEP_R_VALUES=1 x 3\n", "SWEEP_R_VALUES must be an integer, got 'x'"),
    ("SWEEP_SIGMA_VALUES=0 -8\n", "SWEEP_SIGMA_VALUES must be >= 0"),
    ("just some words\n", r"\.env line 1: expected KEY=VALUE"),
    ("\n\nX='unbalanced\n", r"\.env line 3: unbalanced ' quote"),
    ("HF_HOME=$NOT_SET_ANYWHERE/x\n", r"\$NOT_SET_ANYWHERE is not set"),
])
def test_bad_values_give_one_line_errors(tmp_path, dotenv, message):
    with pytest.raises(SettingsError, match=message) as err:
        load(tmp_path, dotenv)
    assert "\n" not in str(err.value)


def test_flags_are_checked_like_the_environment(tmp_path):
    with pytest.raises(SettingsError, match="REPEAT_RUNS must be >= 1"):
        load(tmp_path, repeat_runs=0)


def test_booleans(tmp_path):
    s = load(tmp_path, environ={"RUN_SWEEPS": "0", "ALLOW_STALE_RESULTS": "true", "FORCE": "yes"})
    assert (s.run_sweeps, s.allow_stale_results, s.force) == (False, True, True)


def test_export_hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", "/before")  # so monkeypatch restores it afterwards
    settings.export_hf_home(load(tmp_path, "HF_HOME=/cache/hf\n"))
    assert os.environ["HF_HOME"] == "/cache/hf"
