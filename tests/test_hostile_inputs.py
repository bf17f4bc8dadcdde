"""Hostile and bad input: checkpoints that ship code, hostile result JSON, bad command lines and foreign
working directories.

What must hold: no checkpoint code runs, a hostile result is reported and never rendered, and every failure
is one `streamkv: error: ...` line with exit code 2. In a shared results directory (links, FIFOs, device
nodes, hand-edited numbers: issue 16) nothing outside it is read, written or deleted, nothing hangs, and a
number that disagrees with its artifact never reaches a table. scripts/adversary.py tries the same cases
against an installed streamkv, as a user would. (Disks that fail, kill -9 and concurrent runs:
tests/test_faults.py.)
"""
from __future__ import annotations

import json
import math
import os
import signal
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest

from streamkv import assets, context, files, plans, reports, stages
from streamkv.assets import AssetError
from streamkv.settings import Settings
from streamkv.spec import ModelSpec
from streamkv.store import Store, StoreError, nll_bytes

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


# ------------------------------------------------------------ a shared results directory (issue 16, cases 1-8)
# Each test below is one numbered case of the issue; each failed (or hung, cut by `deadline`) before the fix.
SECRET = "alice:$6$SECRETHASH$abc:19000:0:99999:7:::\n"   # a line of /etc/shadow


class Hang(BaseException):
    """Raised by `deadline`: a BaseException, so that click's CliRunner does not take it for the command's
    own exception and go on to the next (blocking) call."""


@contextmanager
def deadline(seconds: float):
    """Fail instead of hanging: a blocking open() of a FIFO is interrupted by SIGALRM, whose handler raises."""
    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_refused(result, *names: str) -> None:
    """Exit 2 and one error line, the last, that names every one of `names` (a stage may have reported
    what its scan skipped before it stopped)."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith("streamkv: error: "), result.stderr
    assert result.stderr.splitlines()[-1] == errors[0], result.stderr
    assert all(name in errors[0] for name in names), errors[0]


def planned_hashes(tmp_path: Path) -> list[str]:
    ctx = context.context(Settings(results_dir=str(tmp_path / "results")), tokenize=True)   # the faked profile
    return [p.spec.config_hash() for p in plans.plan(ctx, ["main"])]


@pytest.mark.parametrize("lock", ["slot", "claim", "probe"])
def test_case_1_a_link_planted_as_a_lock_claim_or_probe_is_never_followed(invoke, faked, tmp_path, lock):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    results = tmp_path / "results"
    planted = {"slot": [results / "paper_experiments" / "main" / "long" / ".lazy.lock"],
               "claim": [results / ".claims" / f"{h}.lock" for h in planned_hashes(tmp_path)],
               # the probe's old name was .write-probe.<pid>; planted over this process's pid
               "probe": [results / f".write-probe.{os.getpid()}"]}[lock]
    for link in planted:
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(victim)
    result = invoke("main")
    assert victim.read_text() == "precious\n"
    if lock == "probe":   # probes now take fresh names: nothing planted can stand in their way
        assert result.exit_code == 0, result.output
    else:
        assert_refused(result, f"{planted[0]} is a symbolic link")


def test_case_2_a_slot_directory_linked_outside_is_refused_and_nothing_there_is_touched(invoke, faked, tmp_path):
    outside = tmp_path / "x"
    outside.mkdir()
    for name in ("lazy.0123456789ab.nll.f32", ".lazy.json.abc123.tmp", "strict.json"):
        (outside / name).write_text("theirs\n")
    slot_dir = tmp_path / "results" / "paper_experiments" / "main" / "short"
    slot_dir.parent.mkdir(parents=True)
    slot_dir.symlink_to(outside)
    assert_refused(invoke("main"), str(slot_dir), "is a symbolic link")
    assert sorted(p.name for p in outside.iterdir()) == [".lazy.json.abc123.tmp", "lazy.0123456789ab.nll.f32",
                                                         "strict.json"]
    assert all(p.read_text() == "theirs\n" for p in outside.iterdir())
    assert faked[-1].computed == [] if faked else True   # refused before any point was computed
    status = invoke("status")    # a reader reports it and goes on
    assert status.exit_code == 0 and f"problem: {slot_dir} is a symbolic link" in status.stderr


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _null_node(path: Path) -> Path:
    """A copy of /dev/null's device node (mknod needs root, as CI has)."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod(2) needs root")
    return path


def _link_to_victim(path: Path) -> Path:
    path.symlink_to(path.parent / "victim.txt")   # as /dev/stdout links to /proc/self/fd/1
    return path


@pytest.mark.parametrize("make, kind", [(_fifo, "FIFO"), (_null_node, "character device"),
                                        (_link_to_victim, "symbolic link")])
def test_case_3_run_output_on_a_special_file_is_refused_before_computing(invoke, faked, tmp_path, make, kind):
    (tmp_path / "victim.txt").write_text("precious\n")
    output = make(tmp_path / "out.json")
    before = os.lstat(output)
    with deadline(20):
        result = invoke("run", "--output", str(output))
    assert_refused(result, f"--output {output} is a {kind}")
    after = os.lstat(output)
    assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)
    assert (tmp_path / "victim.txt").read_text() == "precious\n" and faked == []


def test_case_3_the_store_never_replaces_or_reads_a_special_file(tmp_path):
    """The store itself, under the CLI's check: a FIFO at the output path is neither opened nor replaced."""
    from fault_workers import write_parts

    fifo = _fifo(tmp_path / "lazy.json")
    store = Store(tmp_path / "results")
    with deadline(20), pytest.raises(StoreError, match="is a FIFO, not a regular file"):
        store.write({"kind": "run", "slot": "main/long/lazy", "config_hash": "a" * 64, "metrics": {}}, path=fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert write_parts(store, "a" * 64, [1.0]).is_file()   # the slot's own path still works


def test_case_4_a_fifo_named_like_a_result_never_blocks(invoke, faked, tmp_path):
    assert invoke("main").exit_code == 0
    lazy = tmp_path / "results" / "paper_experiments" / "main" / "long" / "lazy.json"
    lazy.unlink()
    _fifo(lazy)
    with deadline(30):
        status, tables, main = invoke("status"), invoke("tables"), invoke("main")
    assert status.exit_code == 0 and f"problem: {lazy} is a FIFO, not a regular file" in status.stderr
    assert tables.exit_code == 0 and f"skipped: {lazy} is a FIFO" in tables.stderr
    assert_refused(main, str(lazy), "is a FIFO")
    assert stat.S_ISFIFO(os.lstat(lazy).st_mode)


@pytest.mark.parametrize("where", ["result", "stream index", "cache_len artifact"])
def test_case_5_deeply_nested_json_is_one_line_never_a_recursion_error(invoke, faked, tmp_path, where):
    assert invoke("main").exit_code == 0
    folder = tmp_path / "results" / "paper_experiments" / "main" / "long"
    target = {"result": folder / "lazy.json", "stream index": tmp_path / "results" / "streams" / "long.json",
              "cache_len artifact": next(folder.glob("lazy.*.cache_len.json"))}[where]
    target.write_text("[" * 100000 + "]" * 100000)
    results = [invoke(command) for command in ("status", "tables", "main")]
    for result in results:
        assert result.exit_code == 0 and "Traceback" not in result.output and "RecursionError" not in result.output
    if where == "result":
        assert f"problem: {target}: corrupt JSON (nested more than 64 levels deep)" in results[0].stderr
        assert "main/long/lazy" in faked[-1].computed   # recomputed


def _edit_metrics(doc: dict, folder: Path) -> None:
    doc["metrics"]["perplexity"] = 1.2345


def _edit_consistently(doc: dict, folder: Path) -> None:   # nll_sum and perplexity agree; the artifact does not
    n = doc["metrics"]["n_predicted_tokens"]
    doc["metrics"]["nll_sum"] = n * math.log(1.2345)
    doc["metrics"]["perplexity"] = 1.2345


def _edit_artifact(doc: dict, folder: Path) -> None:       # the NLL file too; its recorded sha256 no longer fits
    _edit_consistently(doc, folder)
    (folder / doc["artifacts"]["nll"]).write_bytes(nll_bytes([math.log(1.2345)] * doc["metrics"]["n_predicted_tokens"]))


def _drop_evidence(doc: dict, folder: Path) -> None:       # remove what the number is checked against
    for key in ("nll_sum", "n_predicted_tokens"):
        del doc["metrics"][key]
    doc["metrics"]["perplexity"] = 1.2345
    doc["artifacts"].pop("nll")


@pytest.mark.parametrize("edit, reason", [
    (_edit_metrics, "metrics.perplexity is not exp(nll_sum / n_predicted_tokens)"),
    (_edit_consistently, "metrics.nll_sum is not the sum of the per-token NLL artifact"),
    (_edit_artifact, "is not the file this result was written with"),
    (_drop_evidence, "is missing: the perplexity cannot be checked")])
def test_case_6_a_hand_edited_number_never_reaches_a_table_and_is_recomputed(invoke, faked, tmp_path, edit, reason):
    assert invoke("main").exit_code == 0
    folder = tmp_path / "results" / "paper_experiments" / "main" / "long"
    doc = json.loads((folder / "lazy.json").read_text())
    edit(doc, folder)
    (folder / "lazy.json").write_text(json.dumps(doc))
    tables = invoke("tables")
    assert tables.exit_code == 0 and "1.234" not in tables.output
    assert "1.234" not in "".join(p.read_text() for p in (tmp_path / "NeurIPS" / "generated").glob("*.tex"))
    problem = [line for line in tables.stderr.splitlines() if "lazy.json" in line]
    assert len(problem) == 1 and reason in problem[0] and "1.234" not in problem[0]
    result = invoke("main")
    assert result.exit_code == 0 and faked[-1].computed == ["main/long/lazy"]   # not reused: recomputed


def test_case_6_results_of_the_previous_schema_are_recomputed_once(invoke, faked, tmp_path):
    assert invoke("main").exit_code == 0
    lazy = tmp_path / "results" / "paper_experiments" / "main" / "long" / "lazy.json"
    doc = json.loads(lazy.read_text())
    del doc["artifact_sha256"]
    lazy.write_text(json.dumps({**doc, "schema_version": 2}))
    result = invoke("main")
    assert "written before results recorded their artifacts' sha256 (schema 2)" in result.stderr
    assert faked[-1].computed == ["main/long/lazy"]
    assert invoke("main").exit_code == 0 and len(faked) == 2   # once: the next run reuses it


def test_case_7_a_model_path_that_does_not_exist_is_one_line(invoke, tmp_path):
    result = invoke("run", "--profile", "paper", env={"MODEL_NAME": "/no/such/dir@abc"})
    assert_refused(result, "MODEL_NAME='/no/such/dir@abc' is neither a local checkpoint directory")


def test_case_7_cpu_threads_has_an_upper_bound(invoke, faked, tmp_path):
    assert_refused(invoke("main", env={"CPU_THREADS": "100000"}), "CPU_THREADS must be <= 1024, got '100000'")
    assert faked == []


def test_case_7_a_dotenv_linked_to_another_file_is_not_quoted(invoke, tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text(SECRET)
    (tmp_path / ".env").symlink_to(secret)
    result = invoke("status")
    assert_refused(result, ".env line 1: not a KEY=VALUE line (not quoted")
    assert "SECRET" not in result.output and "alice" not in result.output
    secret.write_text("CAP_TOTAL=SECRETHASH\n")   # a known key with a value from the other file
    result = invoke("status")
    assert_refused(result, "CAP_TOTAL in")
    assert "SECRET" not in result.output


@pytest.mark.parametrize("knob", ["CAP_TOTAL", "RUN_SWEEPS"])
def test_case_7_an_error_echoes_at_most_a_few_dozen_characters_of_a_value(invoke, tmp_path, knob):
    (tmp_path / ".env").write_text(f"{knob}={'x' * 5000}\n")
    result = invoke("status")
    assert_refused(result, knob)
    assert len(result.stderr) < 300


def test_case_7_a_dotenv_that_doubles_itself_is_bounded(invoke, tmp_path):
    lines = ["A=xxxxxxxxxxxxxxxx"] + [f"{c}=${p}${p}" for p, c in zip("ABCDEFGHIJKLMNOPQRSTUVWXY", "BCDEFGHIJKLMNOPQRSTUVWXYZ")]
    (tmp_path / ".env").write_text("\n".join(lines) + "\n")   # Z would be 16 * 2**25 characters
    assert_refused(invoke("status"), "expands to more than 65536 characters")


def _no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.mark.parametrize("args, message", [
    (["main", "--gpus", "0"], "--gpus '0': torch sees no CUDA device"),
    (["main", "--workers", "2", "--gpus", "0"], "--gpus '0': torch sees no CUDA device"),
    (["run", "--dataset", ""], "has no dataset ''"),
    (["main", "--slurm-python", "python3"], "with the local executor they would be ignored"),
    (["main", "--slurm-partition", "gpu", "--slurm-account", "lab"],
     "--slurm-partition / STREAMKV_SLURM_PARTITION, --slurm-account / STREAMKV_SLURM_ACCOUNT only configure Slurm"),
    (["main", "--slurm-gpus-per-task", "1"], "--slurm-gpus-per-task / STREAMKV_SLURM_GPUS_PER_TASK only configure"),
    (["main", "--workers", "100000"], "--workers / STREAMKV_WORKERS 100000: more local worker processes than"),
])
def test_case_8_silent_accepts_are_refused(invoke, faked, tmp_path, monkeypatch, args, message):
    _no_cuda(monkeypatch)
    assert_refused(invoke(*args), message)
    assert faked == [] or faked[-1].computed == []


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is a directory, not a file of KEY=VALUE lines"),
    (_fifo, "is a FIFO, not a file of KEY=VALUE lines"),
    (lambda p: p.symlink_to(p.parent / "absent.env"), "is a symbolic link to a missing file"),
])
def test_case_8_a_dotenv_that_is_no_file_is_refused(invoke, faked, tmp_path, make, message):
    make(tmp_path / ".env")
    with deadline(20):
        result = invoke("main")
    assert_refused(result, f"{tmp_path / '.env'} {message}")
    assert faked == []


def test_case_8_an_empty_environment_value_that_hides_the_dotenv_is_refused(invoke, faked, tmp_path):
    (tmp_path / ".env").write_text(f"RESULTS_DIR={tmp_path / 'mine'}\n")
    assert_refused(invoke("main", env={"RESULTS_DIR": ""}), "RESULTS_DIR is set but empty in the environment")
    assert faked == [] and not (tmp_path / "results").exists()
