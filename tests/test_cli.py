"""The `streamkv` command line: one-line errors with exit code 2 and no JSON, and each command's effect."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args, message", [
    (["--compress-every", "-1"], "compress_every must be >= 0, got -1"),
    (["--cap-total", "40", "--cache-slack", "8"], "auto-cap leaves window 0 <= 0"),
    (["--window-size", "0"], "window must be > 0"),
    (["--refresh-policy", "bogus"], "unknown refresh_policy 'bogus'"),
    (["--refresh-budget", "4"], "refresh_budget > 0 needs refresh_policy"),
    (["--position-mode", "sideways"], "unknown position_mode 'sideways'"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--mode", "fast"], "unknown mode 'fast'"),
    (["--engine", "warp"], "unknown engine 'warp'"),
    (["--rerotation", "composed_fp16", "--engine", "parallel"], "which the parallel engine never does"),
    (["--dataset", "imagenet"], "profile paper has no dataset 'imagenet'"),
    (["--repeat-runs", "0"], "REPEAT_RUNS must be >= 1"),
])
def test_bad_knobs_fail_in_one_line_without_json(invoke, tmp_path, args, message):
    assert_one_line_error(invoke("run", "--profile", "paper", *args), message, tmp_path)


def test_missing_stream_names_the_fetch_command(invoke, tmp_path):
    result = invoke("run", "--profile", "paper", env={"PG19_SAMPLE_FILE": str(tmp_path / "absent.json")})
    assert_one_line_error(result, "streamkv fetch", tmp_path)


def test_bad_environment_and_dotenv_knobs(invoke, tmp_path):
    assert_one_line_error(invoke("status", "--profile", "paper", env={"REPEAT_RUNS": "0"}), "REPEAT_RUNS", tmp_path)
    assert_one_line_error(invoke("status", env={"STREAMKV_PROFILE": "huge"}), "unknown profile 'huge'", tmp_path)
    (tmp_path / ".env").write_text("STREAMKV_PROFILE=paper\nMIT_REPO=$(touch pwned)\n")
    assert_one_line_error(invoke("status"), "never run as shell", tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_paper_refuses_random_weights(invoke, tmp_path):
    assert_one_line_error(invoke("paper", "--profile", "paper", "--random-weights"), "refuses --random-weights",
                          tmp_path)


def test_status_and_ls_list_the_plan(invoke):
    result = invoke("status", "--profile", "paper")
    assert result.exit_code == 0, result.output
    assert "main/pg19/lazy" in result.stdout and "sweeps/pg19/R=128" in result.stdout
    assert "baselines/wikitext" in result.stdout and "unknown" in result.stdout
    assert invoke("ls", "--profile", "paper").stdout == result.stdout


def test_tables_without_results_write_placeholders(invoke, tmp_path):
    result = invoke("tables", "--profile", "paper", "--out-dir", "gen")
    assert result.exit_code == 0, result.output
    assert "[INSERT DATA]" in (tmp_path / "gen" / "tables.tex").read_text()
    assert "[INSERT DATA]" in result.stdout and (tmp_path / "gen" / "meta.tex").is_file()


def test_fingerprint_prints_json(invoke):
    result = invoke("fingerprint")
    assert result.exit_code == 0 and "torch" in json.loads(result.stdout)


def test_run_writes_one_result_with_the_flags_in_its_spec(invoke, faked, tmp_path):
    result = invoke("run", "--compress-every", "2", "--cache-slack", "2", "--output", "out/x.json")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "out" / "x.json").read_text())
    policy = doc["spec"]["policy"]
    assert (policy["compress_every"], policy["cache_slack"], policy["window"]) == (2, 2, 16 - 2 - 2)
    assert doc["slot"] == f"runs/long/{doc['config_hash'][:12]}" and (tmp_path / "out" / doc["artifacts"]["nll"]).is_file()
    result = invoke("run", "--mode", "baseline", "--random-weights")
    doc = json.loads(Path(result.stdout.strip()).read_text())
    assert doc["spec"]["engine"] == "recompute" and doc["spec"]["model"]["random_weights"] is True
    assert (doc["spec"]["policy"]["n_sink"], doc["spec"]["policy"]["window"]) == (4, 12)


def test_run_takes_a_score_policy_with_its_knobs(invoke, faked, tmp_path):
    # fake profile: C = 16, S = 2; H defaults to half of what the sinks leave, W to the rest
    result = invoke("run", "--policy", "tova", "--compress-every", "3", "--output", "t.json")
    assert result.exit_code == 0, result.output
    policy = json.loads((tmp_path / "t.json").read_text())["spec"]["policy"]
    assert policy == {"name": "tova", "n_sink": 2, "heavy": 7, "window": 7, "compress_every": 3}
    assert invoke("run", "--policy", "h2o", "--heavy", "4", "--output", "h.json").exit_code == 0
    assert json.loads((tmp_path / "h.json").read_text())["spec"]["policy"]["heavy"] == 4


def test_stage_commands_compute_then_reuse(invoke, faked, tmp_path):
    assert invoke("main").exit_code == 0
    assert len(faked[-1].computed) == 6
    result = invoke("main", "--repeat-runs", "2")
    assert len(faked[-1].computed) == 4 and "stale, recomputed: main/long/lazy" in result.stderr
    invoke("main", "-f")
    assert len(faked[-1].computed) == 6
    assert invoke("baseline", "--runs", "2").exit_code == 0 and len(faked[-1].computed) == 2
    result = invoke("main", env={"AUTO_BASELINE": "0", "RESULTS_DIR": "elsewhere"})
    assert_one_line_error(result, "AUTO_BASELINE=0", tmp_path / "elsewhere")


def test_paper_runs_the_enabled_stages_then_the_tables(invoke, faked, tmp_path):
    result = invoke("paper", "--no-pdf", env={"RUN_SWEEPS": "0", "RUN_MIT_REFERENCE": "1"})
    assert result.exit_code == 0, result.output
    slots = faked[-1].computed
    assert "ablations/long/lazy_no_sink" in slots and not any(s.startswith("sweeps") for s in slots)
    assert "mit-reference: skipped: " in result.stderr   # RUN_MIT_REFERENCE=1 without MIT_REPO
    assert (tmp_path / "NeurIPS" / "generated" / "ablations.tex").is_file()


def test_tables_never_import_torch(tmp_path):
    code = ("import sys; from streamkv.cli import main; "
            "main(['tables', '--profile', 'paper', '--out-dir', 'gen'], standalone_mode=False); "
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 3, "`streamkv tables` imported torch"
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "gen" / "tables.tex").is_file()


def test_random_weights_run_on_a_synthetic_stream_needs_no_tokenizer(invoke, monkeypatch):
    from streamkv import assets

    def no_tokenizer(spec):
        raise AssertionError("a synthetic stream must not load a tokenizer")

    monkeypatch.setattr(assets, "load_tokenizer", no_tokenizer)
    result = invoke("run", "--profile", "demo", "--random-weights", "--dataset", "synthetic",
                    "--max-eval-tokens", "300", "--compress-every", "8")
    assert result.exit_code == 0, result.output
    doc = json.loads(Path(result.stdout.strip()).read_text())
    assert doc["spec"]["data"]["path"] == "synthetic:0:2048" and doc["spec"]["model"]["random_weights"]
    assert doc["metrics"]["n_predicted_tokens"] == 299
    refused = invoke("run", "--profile", "demo", "--dataset", "synthetic")
    assert refused.exit_code == 2 and "with --random-weights" in refused.stderr


def test_force_from_the_environment(invoke, faked):
    invoke("main")
    invoke("main", env={"FORCE": "1"})
    assert len(faked[-1].computed) == 6
    runners = len(faked)
    invoke("main")
    assert len(faked) == runners   # everything reused: no runner (and so no model) was even created


def test_run_on_the_demo_model_writes_the_documented_result(invoke, tmp_path):
    """The real path: committed demo checkpoint, tokenizer and stream; baseline, strict and lazy."""
    docs = {}
    for label, args in (("baseline", ["--mode", "baseline"]), ("strict", ["--compress-every", "1"]),
                        ("lazy", ["--compress-every", "16", "--engine", "decode"])):
        result = invoke("run", "--profile", "demo", "--dataset", "demo-long", "--max-eval-tokens", "300", *args,
                        "--output", f"{label}.json")
        assert result.exit_code == 0, result.output
        docs[label] = json.loads((tmp_path / f"{label}.json").read_text())
    for doc in docs.values():
        assert {"schema_version", "config_hash", "spec", "fingerprint", "metrics", "engines"} <= set(doc)
        assert {"git_commit", "git_dirty", "python", "torch", "cuda", "cudnn", "transformers", "datasets",
                "gpu_name", "gpu_driver"} <= set(doc["fingerprint"])
        assert {"perplexity", "n_predicted_tokens", "ttft_ms", "tpot_ms", "tokens_per_s", "peak_memory_mb",
                "kv_cache_bytes"} <= set(doc["metrics"])
        assert doc["metrics"]["n_predicted_tokens"] == 299 and 1 < doc["metrics"]["perplexity"] < 1e4
    assert docs["baseline"]["engines"]["perplexity"] == "recompute"
    assert docs["strict"]["spec"]["policy"]["window"] == docs["lazy"]["spec"]["policy"]["window"] == 252
    assert docs["lazy"]["engines"] == {"perplexity": "decode", "timing": "fast"}   # the fastest exact timer


@pytest.mark.parametrize("args, message", [
    (["--max-eval-tokens", "0"], "--max-eval-tokens"),
    (["--max-eval-tokens", "1"], "--max-eval-tokens"),
    (["--engine", "reference", "--rerotation", "composed_fp16"], "which the reference engine never does"),
    (["--mode", "baseline", "--engine", "decode"], "--mode baseline runs the recompute engine only"),
    (["--mode", "baseline", "--position-mode", "absolute"], "recompute baseline takes position_mode cache"),
    (["--mode", "baseline", "--rerotation", "composed_fp16"], "recompute baseline takes position_mode cache"),
    (["--window-size", "10", "--cap-total", "40"], "--window-size 10 and --cap-total 40 disagree"),
    (["--mode", "baseline", "--window-size", "10", "--cap-total", "40"], "--window-size 10 and --cap-total 40"),
    (["--output", "/proc/x.json"], "--output /proc/x.json cannot be written"),
    (["--policy", "nope"], "unknown policy 'nope'"),
    (["--policy", "h2o", "--cache-slack", "2"], "--cache-slack: knobs of the lazy policy, not of --policy h2o"),
    (["--policy", "tova", "--mode", "baseline"], "--policy tova is for streaming runs"),
    (["--heavy", "3"], "--heavy sets the scored slots of h2o / tova"),
    (["--policy", "h2o", "--window-size", "10", "--cap-total", "40"], "disagree: S+W+H = 31"),
    (["--policy", "tova", "--engine", "fast"], "the fast engine realises schedule policies, not the score-based tova"),
])
def test_run_refuses_before_any_model_loads(invoke, faked, tmp_path, args, message):
    assert_one_line_error(invoke("run", *args), message, tmp_path / "results")
    assert faked == []   # no runner was made, so no model was loaded


def test_window_size_and_cap_total_that_add_up_are_accepted(invoke, faked, tmp_path):
    # fake profile: S=2, σ=0
    result = invoke("run", "--window-size", "10", "--cap-total", "12", "--output", "new/dir/a.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "new" / "dir" / "a.json").read_text())["spec"]["policy"]["window"] == 10
    result = invoke("run", "--mode", "baseline", "--engine", "recompute", "--window-size", "12", "--cap-total", "16")
    assert result.exit_code == 0, result.output
