"""The MIT reference stage against fake streaming-llm checkouts (no torch, no model, no network).

A fake checkout has upstream's layout (examples/eval_long_ppl.py, streaming_llm/kv_cache.py) and its
command-line interface; the script writes log.txt (one NLL per token) and ppl.txt into --output_dir as
upstream does, with every NLL = ln 20 so the perplexity is known, and appends its argv to calls.jsonl.
"""
import hashlib
import json
import math
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamkv import cli, context, mit, mit_runner, profiles, reports, stages
from streamkv.profiles import Dataset, Variant
from streamkv.settings import Settings
from streamkv.policies import PolicySpec
from streamkv.spec import ModelSpec, digest
from streamkv.store import Store
from streamkv.tables import mit as mit_table
from streamkv.tables.render import to_latex

from conftest import scored

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "mit" / "setup.sh"

UPSTREAM_FLAGS = '''
parser.add_argument("--model_name_or_path", type=str, default="models/llama/llama-7b")
parser.add_argument("--revision", type=str, default="main")
parser.add_argument("--tokenizer_name_or_path", type=str, default=None)
parser.add_argument("--dataset_name", type=str, default="wikitext")
parser.add_argument("--task", type=str, default="wikitext-2-raw-v1")
parser.add_argument("--split", type=str, default="test", choices=["validation", "test"])
parser.add_argument("--num_samples", type=int, default=1)
parser.add_argument("--output_dir", type=str, default="outputs/debug")
parser.add_argument("--enable_start_recent_kv_cache", action="store_true")
parser.add_argument("--start_size", type=int, default=1)
parser.add_argument("--recent_size", type=int, default=255)
parser.add_argument("--enable_pos_shift", action="store_true")
parser.add_argument("--num_eval_tokens", type=int, default=None)
'''
SEED_COPY_FLAGS = '''
parser.add_argument("--data-json", type=str, default=None)
parser.add_argument("--text-key", type=str, default="text")
parser.add_argument("--max-eval-tokens", type=int, default=None)
parser.add_argument("--output-json", type=str, default=None)
'''
BODY = '''
args = parser.parse_args()
with open("calls.jsonl", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_MIT_FAIL"):
    print("Loading model ...")
    sys.stderr.write("Traceback (most recent call last):\\nValueError: got gpt_neox\\n")
    sys.exit(1)
if getattr(args, "data_json", None):
    assert json.load(open(args.data_json))["text"]
os.makedirs(args.output_dir, exist_ok=True)
with open(os.path.join(args.output_dir, "log.txt"), "w") as f:
    for _ in range(args.num_eval_tokens):
        print(math.log(20.0), file=f)
print(20.0)
with open(os.path.join(args.output_dir, "ppl.txt"), "w") as f:
    f.write("20.0\\n")
if getattr(args, "output_json", None):
    json.dump({"metrics": {"perplexity": 20.0, "tpot_ms": 1.5}}, open(args.output_json, "w"))
'''


def fake_checkout(root: Path, *, seed_copy: bool = False) -> Path:
    (root / "examples").mkdir(parents=True)
    (root / "streaming_llm").mkdir()
    (root / "streaming_llm" / "__init__.py").write_text("")
    (root / "streaming_llm" / "kv_cache.py").write_text("class StartRecentKVCache:\n    pass\n")
    flags = UPSTREAM_FLAGS + (SEED_COPY_FLAGS if seed_copy else "")
    (root / mit.SCRIPT).write_text("import argparse, json, math, os, sys\nparser = argparse.ArgumentParser()\n"
                                   + flags + BODY)
    return root


def calls(repo: Path) -> list[list[str]]:
    return [json.loads(line) for line in (repo / "calls.jsonl").read_text().splitlines()]


def arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.fixture
def profile(tmp_path):
    """The demo profile shrunk, with the paper's dataset names (upstream knows their hub names)."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    streams = {}
    for name in ("pg19", "wikitext"):
        text = f"{name} text " * 20
        streams[name] = tmp_path / f"{name}.json"
        streams[name].write_text(json.dumps({"text": text, "sha256": hashlib.sha256(text.encode()).hexdigest()}))
    return replace(profiles.DEMO, model=ModelSpec(name=str(model_dir), revision="0" * 64, dtype="float32"),
                   cap_total=32, n_sink=4, lazy_r=8,
                   long=Dataset("pg19", "PG19", str(streams["pg19"]), 50),
                   short=Dataset("wikitext", "WikiText-103", str(streams["wikitext"]), 40))


@pytest.fixture
def lazy_with_slack(monkeypatch):
    """Lazy Pruning spends σ = 4 of the budget on slack (the seed's setup): its window is 4 smaller."""
    def main_variants(self):
        return (Variant("strict", "Start+Recent", (("compress_every", 1),)),
                Variant("lazy", "Lazy Pruning", (("cache_slack", 4),)))
    monkeypatch.setattr(profiles.Profile, "main_variants", main_variants)


def settings(tmp_path, repo) -> Settings:
    return Settings(mit_repo=str(repo) if repo else None, results_dir=str(tmp_path / "results"),
                    python_bin=sys.executable)


def run_mit(s: Settings, profile) -> int:
    """The MIT stage through the one stage loop; the number of failed runs."""
    return len(stages.run_stages(s, ["mit"], profile=profile).failed)


def read(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / "results" / "mit_bench" / f"{name}.json").read_text())


def test_references_take_strict_and_lazy_windows():
    strict = PolicySpec.auto_cap(2048, 32, compress_every=1)
    lazy = PolicySpec.auto_cap(2048, 32, compress_every=64, cache_slack=16)
    plain, matched = mit.references(strict, lazy)
    assert (plain.label, plain.start_size, plain.recent_size) == ("mit_reference", 32, 2016)
    assert (matched.label, matched.start_size, matched.recent_size) == ("mit_reference_windowmatch", 32, 2000)


def test_upstream_cli_records_both_references(tmp_path, profile, lazy_with_slack, capsys):
    repo = fake_checkout(tmp_path / "streaming-llm")
    assert run_mit(settings(tmp_path, repo), profile) == 0

    doc = read(tmp_path, "pg19_mit_reference")
    assert doc["kind"] == "mit_reference" and doc["slot"] == "mit_bench/pg19_mit_reference"
    assert doc["config_hash"] == digest(doc["spec"])
    assert doc["metrics"]["perplexity"] == 20.0   # the script's own printed "20.0", parsed
    # exp(fsum / 49) of 49 float64 ln 20s: the sum rounds once, the division and exp once each, and
    # exp scales the first two by ln 20 ≈ 3: ≤ 10·u64 ≈ 1e-15 relative, asserted at 1e-12.
    assert math.isclose(doc["metrics"]["perplexity_from_log"], 20.0, rel_tol=1e-12)
    assert doc["metrics"]["n_predicted_tokens"] == 49
    assert doc["spec"]["data"] == {"source": "hub", "dataset_name": "pg19", "task": "default", "split": "test"}
    assert (doc["spec"]["start_size"], doc["spec"]["recent_size"]) == (4, 28)
    assert doc["use_in_main_table"] is False
    assert any("pos_shift" in line for line in doc["limitations"])
    assert any("not our pinned sample" in line for line in doc["limitations"])
    assert {"git_commit", "torch", "transformers"} <= set(doc["fingerprint"])
    assert (tmp_path / "results" / "mit_bench" / doc["artifacts"]["nll"]).stat().st_size == 49 * 4

    matched = read(tmp_path, "pg19_mit_reference_windowmatch")
    assert (matched["spec"]["start_size"], matched["spec"]["recent_size"]) == (4, 24)   # 32 − S − σ
    assert matched["mit"]["matches"]["recent_size"] == {"main/pg19/strict": 28, "main/pg19/lazy": 24}

    argv = calls(repo)
    assert len(argv) == 4                       # two datasets × two references
    first = argv[0]
    assert "--enable_start_recent_kv_cache" in first and "--enable_pos_shift" in first
    sizes = (arg(first, "--start_size"), arg(first, "--recent_size"), arg(first, "--num_eval_tokens"))
    assert sizes == ("4", "28", "49")
    assert (arg(first, "--model_name_or_path"), arg(first, "--dataset_name")) == (profile.model.name, "pg19")
    assert arg(argv[2], "--task") == "wikitext-103-raw-v1"
    assert read(tmp_path, "wikitext_mit_reference")["metrics"]["n_predicted_tokens"] == 39

    # Everything current: a second run reuses all four results without calling the script.
    assert run_mit(settings(tmp_path, repo), profile) == 0
    assert len(calls(repo)) == 4
    assert "mit: 4 points: 4 reused" in capsys.readouterr().err


def test_equal_windows_copy_instead_of_rerunning(tmp_path, profile, capsys):
    repo = fake_checkout(tmp_path / "streaming-llm")
    assert run_mit(settings(tmp_path, repo), profile) == 0
    assert len(calls(repo)) == 2                # σ = 0: the window-matched run would repeat the plain one
    assert read(tmp_path, "pg19_mit_reference_windowmatch")["spec"] == read(tmp_path, "pg19_mit_reference")["spec"]
    assert "2 copied from an equal spec" in capsys.readouterr().err


def test_a_checkout_changed_after_planning_is_not_run(tmp_path, profile):
    """The config_hash names MIT's code as planned; running other code under it would mislabel the number."""
    repo = fake_checkout(tmp_path / "streaming-llm")
    s = settings(tmp_path, repo)
    ctx = context.context(s, tokenize=False, profile=profile)
    point = next(p for p in ctx.mit())
    (repo / mit.SCRIPT).write_text((repo / mit.SCRIPT).read_text() + "# edited after planning\n")
    with pytest.raises(mit_runner.MitFailure, match="changed since it was planned"):
        mit_runner.MitRunner(ctx.store, s).run(point.slot, point.spec)
    assert not (repo / "calls.jsonl").exists() and not list((tmp_path / "results").rglob("*.json"))


def test_seed_copy_scores_our_stream_file(tmp_path, profile):
    repo = fake_checkout(tmp_path / "streaming-llm", seed_copy=True)
    assert run_mit(settings(tmp_path, repo), profile) == 0
    first = calls(repo)[0]
    assert (arg(first, "--data-json"), arg(first, "--max-eval-tokens")) == (profile.long.path, "50")
    doc = read(tmp_path, "pg19_mit_reference")
    assert doc["spec"]["data"]["source"] == "stream"
    assert doc["metrics"]["mit_reported"] == {"perplexity": 20.0, "tpot_ms": 1.5}
    assert not any("not our pinned sample" in line for line in doc["limitations"])


@pytest.mark.parametrize("mit_repo, reason", [(None, "MIT_REPO is not set"),
                                              ("elsewhere", "is not a streaming-llm checkout")])
def test_skip_without_checkout(tmp_path, monkeypatch, mit_repo, reason):
    monkeypatch.chdir(tmp_path)                 # no .env of the working tree
    monkeypatch.delenv("MIT_REPO", raising=False)
    (tmp_path / "elsewhere").mkdir()
    flags = ["--results-dir", str(tmp_path / "results")] + (["--mit-repo", mit_repo] if mit_repo else [])
    result = CliRunner().invoke(cli.main, ["mit-reference", *flags])
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and skipped[0].startswith("mit-reference: skipped: ") and reason in skipped[0]
    assert not list((tmp_path / "results").rglob("*.json"))


def test_failing_script_leaves_a_log_and_no_json(tmp_path, profile, monkeypatch):
    repo = fake_checkout(tmp_path / "streaming-llm")
    monkeypatch.setenv("FAKE_MIT_FAIL", "1")
    monkeypatch.setattr(profiles, "resolve", lambda s: profile)
    monkeypatch.chdir(tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    result = CliRunner().invoke(cli.main, ["mit-reference", "--mit-repo", str(repo), "--results-dir",
                                           str(tmp_path / "results")])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if "failed with exit code" in line]
    assert len(lines) == 2 * 2                  # every reference failed, one line each
    assert "0 computed, 0 computed by a concurrent run, 0 stale kept, 4 failed" in result.stderr
    assert "exit code 1" in lines[0] and "ValueError: got gpt_neox" in lines[0]
    out = tmp_path / "results" / "mit_bench"
    assert not list(out.glob("*.json"))
    assert sorted(p.name for p in out.iterdir()) == [f"{d}_{ref}.log" for d in ("pg19", "wikitext")
                                                     for ref in ("mit_reference", "mit_reference_windowmatch")]
    assert not list(scratch.iterdir())          # the script's --output_dir is gone too
    log = (out / "pg19_mit_reference.log").read_text()
    assert "exit code: 1" in log and "ValueError: got gpt_neox" in log and "Loading model" in log


PATCHED_UTILS_FLAGS = '''
parser.add_argument("--device", type=str, default="cuda")
parser.add_argument("--dtype", type=str, default="float16")
parser.add_argument("--data-json", type=str, default=None)
parser.add_argument("--max-eval-tokens", type=int, default=None)
'''


def patched_checkout(root: Path) -> Path:
    """A fake checkout as `make mit-env` leaves it: the setup patch's flags live in streaming_llm/utils.py
    (upstream's parse_args), and scripts/mit/setup.sh's marker names the commit and the patch."""
    repo = fake_checkout(root)
    script = (repo / mit.SCRIPT).read_text()
    (repo / mit.SCRIPT).write_text(script.replace(UPSTREAM_FLAGS, UPSTREAM_FLAGS + PATCHED_UTILS_FLAGS))
    (repo / mit.ARGS_MODULE).write_text("def parse_args():\n    pass\n" + PATCHED_UTILS_FLAGS)
    (repo / mit.PATCH_MARKER).write_text("commit 2e5042606d69933d88fbf909bd77907456b9b4dd\npatch abc123\n")
    return repo


def test_patched_checkout_runs_on_our_device_dtype_and_stream_and_the_table_compares(tmp_path, profile):
    repo = patched_checkout(tmp_path / "streaming-llm")
    s = replace(settings(tmp_path, repo), run_mit_reference=True)
    assert run_mit(s, profile) == 0
    first = calls(repo)[0]
    assert (arg(first, "--device"), arg(first, "--dtype")) == ("cpu", "float32")
    assert arg(first, "--data-json") == profile.long.path
    doc = read(tmp_path, "pg19_mit_reference")
    assert doc["spec"]["options"] == {"device": "cpu", "dtype": "float32"}
    assert doc["mit"]["patch"] == mit.PATCH_FILE and doc["mit"]["commit"].startswith("2e50426")
    assert not any("hard-coded to 'cuda'" in line for line in doc["limitations"])

    # Our strict point on the same tokens: the appendix table shows both numbers and their difference.
    nll, metrics = scored([math.log(19.5)] * 49)   # perplexity 19.5, as the store checks it on read
    ours = {"kind": "run", "slot": "main/pg19/strict", "config_hash": "0" * 64, "spec": {}, "metrics": metrics}
    Store(s.results_dir).write(ours, nll=nll)
    ctx = context.context(s, tokenize=False, profile=profile)
    spec = reports.tables_spec(ctx)
    assert [(c.reference.slot, c.ours.slot) for c in spec.rows["mit"]] == [
        ("mit_bench/pg19_mit_reference", "main/pg19/strict"), ("mit_bench/pg19_mit_reference_windowmatch",
                                                              "main/pg19/lazy"),
        ("mit_bench/wikitext_mit_reference", "main/wikitext/strict"),
        ("mit_bench/wikitext_mit_reference_windowmatch", "main/wikitext/lazy")]
    tex = to_latex(mit_table.build(lambda slot: ctx.store.lookup(slot, None, True), spec))
    row = next(line for line in tex.splitlines() if line.startswith("PG19 & MIT Start+Recent &"))
    assert "20.000" in row and "19.500" in row and "+0.5$" in row and "49 / 49" in row
    assert "commit 2e50426" in tex and "scripts/mit/streaming-llm.patch" in tex.replace(r"\_\allowbreak{}", "_")


def test_setup_refuses_what_is_not_a_clone_in_one_line(tmp_path):
    done = subprocess.run(["bash", str(SETUP), str(tmp_path), "2e5042606d69933d88fbf909bd77907456b9b4dd",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    assert done.stderr.startswith("streamkv: error: MIT_REPO=") and len(done.stderr.splitlines()) == 1
