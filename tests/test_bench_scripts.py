"""The GPU benchmark scripts' CPU paths, checked before a GPU call spends device time on them.

bench_decode.py's ratios only mean something if its floor is the anchor's floor and each ratio divides
numbers of one call; profile_decode.py's kernels only describe the engine if the step it captures is the
engine's step; probe_recompute_compile.py's compiled forward only says what compiling would buy if it
computes what the eager one does; profile_recompute.py's TFLOP/s are only rates if its FLOP counts are the
forward's. They run here on the demo-size model (the CUDA graph stubbed by a plain
call).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from streamkv.engines import fast
from streamkv.engines.attention import swapped_attention
from streamkv.policies import PolicySpec, build_schedule
from bounds import EXACT
from test_engines import max_diff
from tiny_models import cached_model, cached_stream

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_compile_cache  # noqa: E402
import bench_decode  # noqa: E402
import probe_attention  # noqa: E402
import probe_recompute_compile  # noqa: E402
import profile_decode  # noqa: E402
import profile_recompute  # noqa: E402

H100_ANCHOR = json.loads((ROOT / "docs/bench/h100_hf_anchor_issue17.json").read_text())


def test_the_floor_is_the_anchors_for_the_anchors_model():
    """Pythia-2.8B at cap 2048 over the anchor's copy bandwidth: the anchor's own floor (it rounds to µs)."""
    model = bench_decode.build_model(argparse.Namespace(tiny=False, device="meta", dtype="float16", config=None))
    assert bench_decode.floor_ms(model, 2048, H100_ANCHOR["copy_TBps"]) == pytest.approx(H100_ANCHOR["floor_ms"],
                                                                                          abs=5e-4)
    assert bench_decode.floor_ms(model, 4096, H100_ANCHOR["copy_TBps"]) > H100_ANCHOR["floor_ms"] + 0.1


ANCHOR = {"copy_TBps": 0.01, "hf_dense_ms": 10.0, "hf_strict_ms": 20.0, "hf_lazy64_ms": 30.0, "recompute_ms": 40.0}
TINY_RUN = ["--tiny", "--cap", "32", "--steps", "6", "--lazy-r", "4", "--warmup", "0", "--repeats", "1",
            "--stability-runs", "1"]


def test_ratios_divide_numbers_of_one_call(tmp_path):
    (tmp_path / "anchor.json").write_text(json.dumps(ANCHOR))
    engine = "fast:compile=0"
    bench_decode.main([*TINY_RUN, "--engines", engine, "--recompute-batches", "1,3",
                       "--anchor", str(tmp_path / "anchor.json"), "--out", str(tmp_path / "bench.json")])
    summary = json.loads((tmp_path / "bench.json").read_text())
    assert summary["anchor"] == ANCHOR
    for name, row in summary["engines"][engine]["runs"][0].items():
        tpot = row["tpot_ms"]["median"]
        assert summary["ratios"][f"{engine}_{name}_over_floor"] == pytest.approx(tpot / summary["floor_ms"])
        assert summary["ratios"][f"hf_strict_ms_over_{engine}_{name}"] == pytest.approx(20.0 / tpot)
    for name, row in summary["recompute"].items():
        tpot = row["tpot_ms"]["median"]
        assert summary["ratios"][f"hf_recompute_ms_over_recompute_{name}"] == pytest.approx(40.0 / tpot)
    # Batches of one and three windows score the same tokens alike (float32 on CPU: rounding only).
    assert summary["recompute"]["batch3"]["agreement_with_first"]["max_abs_nll_diff"] < 1e-4


def test_the_compiled_recompute_is_timed_beside_eager(tmp_path, monkeypatch):
    """--recompute-compile adds each batch size compiled (traced by dynamo, run eagerly here: the
    question is which rows the bench times and that they score the tokens alike)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    bench_decode.main([*TINY_RUN, "--engines", "", "--recompute-batches", "1,3", "--recompute-compile",
                       "--out", str(tmp_path / "bench.json")])
    recompute = json.loads((tmp_path / "bench.json").read_text())["recompute"]
    assert list(recompute) == ["batch1", "batch1_compiled", "batch3", "batch3_compiled"]
    assert all(row["agreement_with_first"]["max_abs_nll_diff"] < 1e-4 for row in recompute.values())


def test_a_run_cut_short_keeps_its_ratios(tmp_path, monkeypatch):
    """A device call's deadline kills the bench between engines: the JSON on disk already holds the first
    engine's rows with their ratios to the anchor's floor."""
    (tmp_path / "anchor.json").write_text(json.dumps(ANCHOR))
    protocol = bench_decode.protocol

    def deadline(args, engine, model, ids):
        if engine != "fast:compile=0":
            raise KeyboardInterrupt   # killed here: the file holds what was written before
        return protocol(args, engine, model, ids)

    monkeypatch.setattr(bench_decode, "protocol", deadline)
    with pytest.raises(KeyboardInterrupt):
        bench_decode.main([*TINY_RUN, "--engines", "fast:compile=0,decode", "--anchor", str(tmp_path / "anchor.json"),
                           "--out", str(tmp_path / "bench.json")])
    summary = json.loads((tmp_path / "bench.json").read_text())
    strict = summary["engines"]["fast:compile=0"]["runs"][0]["strict"]["tpot_ms"]["median"]
    assert summary["ratios"]["fast:compile=0_strict_over_floor"] == pytest.approx(strict / summary["floor_ms"])
    assert "decode" not in summary["engines"]


def test_the_profiled_step_is_the_engines_step(monkeypatch):
    """profile_decode's stream, prefilled and stepped, scores each token as fast.evaluate does (float64)."""
    monkeypatch.setattr(fast, "_capture", lambda step: SimpleNamespace(replay=step))
    monkeypatch.setattr(profile_decode.compile_cache, "compiled", lambda step: step)   # the engine's own step
    model, ids, cap, sink, steps = cached_model("gpt_neox", float64_numerics=True), cached_stream(96), 32, 2, 20
    with torch.inference_mode(), swapped_attention(model, fast.ATTN_IMPLEMENTATION, "fast"):
        try:
            graph, stream = profile_decode.captured_step(model, ids, cap, sink, "sdpa", "torch")
            for _ in range(steps):
                graph.replay()
        finally:
            fast._Active.ring = None
    schedule = build_schedule(PolicySpec(n_sink=sink, window=cap - sink, compress_every=1), ids.numel())
    want = fast.evaluate(model, ids, schedule, position_mode="cache", loss_dtype="float32", graph=False, compile=False)
    fed = slice(0, stream.prefill_len + steps)
    assert int(stream.t) == stream.prefill_len + steps
    assert max_diff(stream.nll[fed], want.nll[fed]) <= EXACT
    assert stream.nll[fed].abs().min() > 0      # every one of those tokens was scored


def test_the_compiled_recompute_forward_gives_the_eager_logits():
    """probe_recompute_compile times torch.compile of the recompute engine's forward: what it compiles must
    compute the eager logits (float32 on CPU: fusions round differently, nothing more)."""
    args = probe_recompute_compile.parse_args(["--tiny", "--cap", "16", "--batch", "3", "--repeats", "2"])
    record = probe_recompute_compile.probe(args)
    assert record["max_abs_logit_diff"] < 1e-4
    assert all(len(row["runs"]) == 2 and row["median"] > 0 for row in record["ms_per_window"].values())


def test_the_recompute_profile_counts_the_forwards_flops():
    """profile_recompute's FLOPs per window against torch's own FLOP counter over the engine's forward of B
    windows, with attention written as matmuls (eager) so the counter sees it: the counter counts QKᵀ and PV
    in full, the profile halves them for the causal mask."""
    from torch.utils.flop_counter import FlopCounterMode
    from streamkv import compat
    model = profile_recompute.build_model(argparse.Namespace(tiny=True, device="cpu", dtype="float32"))
    model.config._attn_implementation = "eager"
    batch, cap = 3, 16
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        compat.last_logits(model, torch.randint(model.config.vocab_size, (batch, cap)))
    flops = profile_recompute.flops_per_window(model, cap)
    assert counter.get_total_flops() == batch * (flops["matmul"] + 2 * flops["attention"])


def test_a_backend_that_refuses_the_shape_is_recorded_not_raised():
    """profile_recompute holds SDPA to each fused backend in turn; one the machine lacks (cuDNN's, on a CPU)
    is a line in the record, and the others are still timed."""
    from streamkv import compat
    model = profile_recompute.build_model(argparse.Namespace(tiny=True, device="cpu", dtype="float32"))
    windows = torch.randint(model.config.vocab_size, (2, 16))
    with torch.inference_mode():
        rows = profile_recompute.sdpa_backends(lambda: compat.last_logits(model, windows), 2, 1, "cpu")
    assert "refused" in rows["CUDNN_ATTENTION"]
    assert rows["FLASH_ATTENTION"]["median"] > 0


def test_the_attention_probe_times_the_default_launch():
    """probe_attention reports flash_decode's own launch beside the best: its grid must hold it."""
    from streamkv.engines import flash_decode
    assert flash_decode.TILE in probe_attention.tiles()
    assert len(probe_attention.tiles()) == len({tuple(t.values()) for t in probe_attention.tiles()})


def test_inductor_settings_are_typed_and_unknown_keys_refused():
    args = bench_decode.parse_args(["--tiny", "--inductor", "coordinate_descent_tuning=1,max_autotune=0"])
    assert args.inductor == {"coordinate_descent_tuning": True, "max_autotune": False}
    for wrong in ("coordinate_descent_tunning=1", "coordinate_descent_tuning=yes"):
        with pytest.raises(SystemExit):
            bench_decode.parse_args(["--tiny", "--inductor", wrong])


def test_an_engine_keeps_all_its_options_in_the_engine_list():
    """Commas separate engines and one engine's options alike: fused GEMV plus flash is one engine."""
    args = bench_decode.parse_args(["--tiny", "--engines", "fast,fast:linear=triton_fused,decode_attention=flash,"
                                    "decode:compile=0"])
    assert args.engines == ["fast", "fast:linear=triton_fused,decode_attention=flash", "decode:compile=0"]
    with pytest.raises(SystemExit):
        bench_decode.parse_args(["--tiny", "--engines", "linear=torch,fast"])


def test_every_later_engine_is_checked_against_the_first(tmp_path):
    """An engine option is a speed choice: the bench records each later engine's NLL against the first's."""
    engines = ["fast:compile=0", "fast:compile=0,graph=0", "decode"]
    bench_decode.main([*TINY_RUN, "--engines", ",".join(engines), "--out", str(tmp_path / "bench.json")])
    summary = json.loads((tmp_path / "bench.json").read_text())["engines"]
    assert "agreement_with_first" not in summary[engines[0]]
    for engine in engines[1:]:
        rows = summary[engine]["agreement_with_first"]
        assert set(rows) == {"dense", "strict", "lazy4"}
        assert all(row["max_abs_nll_diff"] < 1e-4 and row["tokens"] == 32 + 6 for row in rows.values())


def test_the_compile_cache_bench_takes_the_fast_engines_options_only():
    """bench_compile_cache.py --engine: the fast engine's compiled step with other options (linears,
    attention), in bench_decode.py's syntax; another engine, or compile itself switched, is refused."""
    args = bench_compile_cache.parse_args(["--engine", "fast:linear=torch,decode_attention=flash"])
    assert args.options == {"linear": "torch", "decode_attention": "flash"}
    assert bench_compile_cache.parse_args([]).options == {}
    for wrong in ("decode", "fast:compile=0"):
        with pytest.raises(SystemExit):
            bench_compile_cache.parse_args(["--engine", wrong])


SUITE = Path(__file__).resolve().parents[1] / "scripts" / "bench_speed_suite.sh"


def run_suite(tmp_path, steps: str, seconds: int = 560):
    """bench_speed_suite.sh with `python3` and `nvidia-smi` stubs that print each argument they get in
    brackets; returns (the finished process, its log)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for tool in ("python3", "nvidia-smi"):
        (stubs / tool).write_text('#!/bin/sh\nfor a in "$@"; do echo "[$a]"; done\n')
        (stubs / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STEPS": steps}
    done = subprocess.run(["bash", str(SUITE), "anchor.py", str(tmp_path / "out"), str(seconds)], env=env,
                          cwd=SUITE.parents[1], capture_output=True, text=True, timeout=60)
    log = tmp_path / "out" / "log.txt"
    return done, log.read_text() if log.exists() else ""


def ran(log: str) -> list[str]:
    return [line.split(":")[0][3:] for line in log.splitlines() if line.startswith("== ") and ": exit " in line]


def test_the_suite_runs_the_anchor_then_the_steps_in_the_order_named(tmp_path):
    """Not in the script's order (gemv_kernels is near its end): a call's first step is its most decisive."""
    done, log = run_suite(tmp_path, "gemv_kernels cuda_tests bench_gqa")
    assert done.returncode == 0, done.stderr
    assert ran(log) == ["anchor", "gemv_kernels", "cuda_tests", "bench_gqa"]
    assert "[scripts/probe_gemv.py]" in log and "[cuda or flash_decode or gemv]" in log   # arguments kept whole


def test_a_step_that_does_not_fit_is_skipped_with_a_line(tmp_path):
    done, log = run_suite(tmp_path, "gemv_kernels", seconds=100)
    assert done.returncode == 0 and ran(log) == ["anchor"]
    assert "== gemv_kernels: skipped (needs 180s" in log


def test_an_unknown_step_is_refused_before_anything_runs(tmp_path):
    done, log = run_suite(tmp_path, "bench_gqa gemv_kernal")
    assert done.returncode == 2 and "no step gemv_kernal" in done.stderr
    assert "[" not in log and not ran(log)
