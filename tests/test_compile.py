"""Compilation paid once (streamkv/compile_cache.py): within a process an evaluation with the shapes of an
earlier one compiles nothing, new shapes past dynamo's own recompile limit still compile (and past ours,
fail loudly instead of running eagerly), and the recompute baseline's compiled forward sees one window
shape; across processes Inductor's cache under the results directory
serves the second process; the results store never mistakes that cache for results.

The in-process tests count dynamo's compilations with a counting backend (torch._dynamo.testing.
CompileCounter: traces like Inductor's, runs the graph eagerly), so no code is generated; the fast engine
runs without a CUDA graph, which is how it compiles on the CPU.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from streamkv import compile_cache, profiles
from streamkv.engines import fast
from streamkv.engines.recompute import evaluate_recompute
from streamkv.policies import PolicySpec, build_schedule
from streamkv.runner import Runner
from streamkv.store import Store
from bounds import EXACT
from tiny_models import cached_model, cached_stream
from tiny_runner import tiny  # noqa: F401 (fixture)

POLICY = PolicySpec(n_sink=2, window=12, compress_every=4)


@pytest.fixture
def counter(monkeypatch):
    """Every torch.compile of this test traces into a CompileCounter; dynamo's caches start empty."""
    torch._dynamo.reset()
    counting = CompileCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting))
    yield counting
    torch._dynamo.reset()


def evaluate(n_tokens: int, *, compile: bool = True):
    schedule = build_schedule(POLICY, n_tokens)
    return fast.evaluate(cached_model("gpt_neox"), cached_stream(n_tokens), schedule, loss_dtype="float64",
                         graph=False, compile=compile)


def test_evaluations_of_one_shape_compile_once(counter):
    first = evaluate(40)
    compiled = counter.frame_count
    assert compiled >= 1
    for _ in range(3):     # each builds a new stream object: dynamo must not guard on its identity
        again = evaluate(40)
    assert counter.frame_count == compiled
    assert torch.equal(again.nll, first.nll)
    assert (again.nll - evaluate(40, compile=False).nll).abs().max().item() <= EXACT


def test_the_compiled_recompute_baseline_compiles_one_window_shape(counter):
    """27 windows in batches of 5: the last batch, 2 windows, is padded to 5, so the compiled forward sees
    one shape, and a second evaluation compiles nothing; the NLL is the eager one."""
    model, ids = cached_model("gpt_neox"), cached_stream(40)
    eager = evaluate_recompute(model, ids, 12, loss_dtype="float64", batch=5)
    first = evaluate_recompute(model, ids, 12, loss_dtype="float64", batch=5, compile=True)
    assert counter.frame_count == 1
    again = evaluate_recompute(model, ids, 12, loss_dtype="float64", batch=5, compile=True)
    assert counter.frame_count == 1
    assert torch.equal(again.nll, first.nll)
    assert (first.nll - eager.nll).abs().max() <= EXACT


def test_streams_of_one_table_length_share_a_compiled_step(counter, monkeypatch):
    """Per-token tables are padded to a multiple of STREAM_MULTIPLE (fast.table_length), so lengths up to
    the next multiple compile nothing more, and the numbers are those of the eager step."""
    monkeypatch.setattr(fast, "STREAM_MULTIPLE", 48)
    evaluate(40)
    compiled = counter.frame_count
    for n_tokens in (41, 44, 48):
        result = evaluate(n_tokens)
        assert result.nll.shape == (n_tokens - 1,)
        assert (result.nll - evaluate(n_tokens, compile=False).nll).abs().max().item() <= EXACT
    assert counter.frame_count == compiled
    evaluate(49)   # the next multiple: another shape
    assert counter.frame_count > compiled


def test_paper_streams_share_a_table_length():
    """What the padding is for: the paper profile's timing prefix (C + timing_tokens + 1, also the bench's
    prefix), WikiText's stream (4096), and a timing prefix of 2048 tokens (C + 2048 + 1), at C = 2048."""
    timing_prefix = profiles.PAPER.cap_total + profiles.PAPER.timing_tokens + 1
    assert len({fast.table_length(n) for n in (timing_prefix, 4096, 2048 + 2048 + 1)}) == 1


def test_shapes_past_dynamos_own_limit_still_compile(counter, monkeypatch):
    """Dynamo's recompile_limit (8 by default; 1 here) would run the third shape's step eagerly, silently."""
    monkeypatch.setattr(fast, "STREAM_MULTIPLE", 1)   # every stream length its own shape
    counts = []
    with torch._dynamo.config.patch(recompile_limit=1):
        for n_tokens in (40, 41, 42):
            evaluate(n_tokens)
            counts.append(counter.frame_count)
    assert counts[0] < counts[1] < counts[2]


def test_shapes_past_our_limit_fail_loudly(counter, monkeypatch):
    monkeypatch.setattr(compile_cache, "MAX_SHAPES", 2)
    monkeypatch.setattr(fast, "STREAM_MULTIPLE", 1)
    evaluate(40)
    evaluate(41)
    with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
        evaluate(42)


# One process's compilation of a small function, with the cache configured as the runner does; prints what
# compile_cache.record() says.
_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from streamkv import compile_cache
    compile_cache.configure(sys.argv[1])
    torch.set_num_threads(1)
    f = compile_cache.compiled(lambda: (X.sin() * 3 + 1).sum(-1))
    X = torch.arange(12.0).reshape(3, 4)
    with torch.inference_mode():
        f()
    print(json.dumps(compile_cache.record()))
""")


def test_a_second_process_compiles_from_the_cache(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop(compile_cache.ENV, None)
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    runs = [json.loads(subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "results")], env=env,
                                      check=True, capture_output=True, text=True, timeout=240).stdout)
            for _ in range(2)]
    where = str(tmp_path / "results" / compile_cache.RESULTS_SUBDIR)
    assert [r["dir"] for r in runs] == [where, where]
    assert runs[0]["fxgraph_cache_miss"] >= 1 and runs[0]["fxgraph_cache_hit"] == 0
    assert runs[1]["fxgraph_cache_hit"] >= 1 and runs[1]["fxgraph_cache_miss"] == 0


@pytest.mark.parametrize("chosen", [None, "elsewhere"])
def test_the_runner_places_and_records_the_cache(tiny, tmp_path, monkeypatch, chosen):  # noqa: F811
    store, make_spec = tiny
    if chosen:
        monkeypatch.setenv(compile_cache.ENV, str(tmp_path / chosen))
    else:
        monkeypatch.delenv(compile_cache.ENV, raising=False)
    runner = Runner(store, progress=False)
    expected = tmp_path / chosen if chosen else store.root.absolute() / compile_cache.RESULTS_SUBDIR
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(expected)
    doc = store.read(runner.run("baselines/long", make_spec(mode="baseline", engine="recompute",
                                                            policy=PolicySpec(n_sink=4, window=12))))
    assert doc["fingerprint"]["compile_cache"]["dir"] == str(expected)
    assert set(doc["fingerprint"]["compile_cache"]) == {"dir"} | {name for _, name in compile_cache.COUNTERS}


def _plant_cache_lookalikes(results) -> Path:
    """What Inductor might leave below the cache, named like results: a bad JSON, a temp file, a link, a FIFO."""
    cache = results / compile_cache.RESULTS_SUBDIR
    (cache / "fxgraph" / "ab").mkdir(parents=True)
    (cache / "fxgraph" / "ab" / "entry.json").write_text("{not json")
    (cache / ".x.abc.tmp").write_text("")
    (cache / "link.json").symlink_to("/etc/passwd")
    os.mkfifo(cache / "fifo.json")
    return cache


def test_the_store_never_reads_the_compile_cache(tmp_path):
    """None of the cache is a result, a problem, or something to tidy."""
    cache = _plant_cache_lookalikes(tmp_path / "results")
    store = Store(tmp_path / "results")
    report = store.scan()
    assert not report.problems and not report.entries
    assert store.sweep() == []
    assert (cache / ".x.abc.tmp").is_file() and (cache / "link.json").is_symlink()


def test_status_and_tables_ignore_the_compile_cache(invoke, faked, tmp_path):
    assert invoke("main").exit_code == 0
    clean = invoke("status"), invoke("tables")
    _plant_cache_lookalikes(tmp_path / "results")
    status, tables = invoke("status"), invoke("tables")
    assert status.exit_code == tables.exit_code == 0
    assert (status.output, tables.output) == (clean[0].output, clean[1].output)
