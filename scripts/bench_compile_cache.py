"""Compile paid once across processes: the wall time of one fast-engine evaluation in a first process (empty
compile cache) and in the processes after it (the cache the first one filled), each its own subprocess.

GPU (Pythia-2.8B architecture, random fp16 weights, cap 2048, lazy R = 64, CUDA graph of the compiled step):
    python3 scripts/bench_compile_cache.py --out compile_cache.json
CPU check at demo size (the demo model's architecture, fp32, compiled step without a graph):
    python3 scripts/bench_compile_cache.py --tiny
Another option of the fast engine, e.g. its step with cuBLAS's linears (bench_decode.py's syntax):
    python3 scripts/bench_compile_cache.py --engine fast:linear=torch

The cache directory is a fresh temporary folder unless --cache-dir names one (which must then be empty, or
the first process would not start cold). Each process imports torch, builds the model, and runs one
evaluation (`streamkv.engines.fast.evaluate`: compilation, warm-up, capture, prefill, --steps decoded
tokens); it reports its phases' wall times, the evaluation's TPOT and the cache's hit/miss counters
(streamkv/compile_cache.py). The parent adds each subprocess's wall time as it saw it, and prints the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # runs from a bare checkout, no install needed
from engine_spec import engine_options  # noqa: E402  (same folder, torch-free: bench_decode.py's engine syntax)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="demo-size model on the CPU")
    p.add_argument("--processes", type=int, default=2, help="processes in a row on one cache (the first is cold)")
    p.add_argument("--steps", type=int, default=256, help="decoded tokens of the evaluation")
    p.add_argument("--engine", default="fast", help="the fast engine with options, as bench_decode.py "
                   "--engines takes them, e.g. fast:linear=torch (default: the engine's defaults)")
    p.add_argument("--cache-dir", type=Path, help="an empty directory (default: a fresh temporary one)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)   # one measured process
    args = p.parse_args(argv)
    engine, args.options = engine_options(args.engine)
    if engine != "fast" or "compile" in args.options:
        p.error(f"--engine {args.engine!r}: this bench times the fast engine's compiled step, with other options")
    return args


def child(args) -> dict:
    """One process: import, model, one evaluation; the phases' wall times and the cache counters."""
    began = time.perf_counter()
    import torch

    from bench_engines import build_model   # same folder: one model builder
    from streamkv import compile_cache
    from streamkv.engines import fast
    from streamkv.policies import PolicySpec, build_schedule

    imported = time.perf_counter()
    where = compile_cache.configure(REPO / "results")   # $STREAMKV_COMPILE_CACHE, set by the parent
    torch.set_num_threads(1)
    device = "cpu" if args.tiny else "cuda"
    model = build_model(argparse.Namespace(tiny=args.tiny, device=device, dtype="float32" if args.tiny else "float16"))
    cap = 256 if args.tiny else 2048
    ids = torch.randint(0, model.config.vocab_size, (cap + args.steps + 1,), generator=torch.Generator().manual_seed(0))
    schedule = build_schedule(PolicySpec(n_sink=4, window=cap - 4, compress_every=64), ids.numel())
    built = time.perf_counter()
    # graph on CUDA (the engine's default); on the CPU the compiled step runs without one.
    result = fast.evaluate(model, ids, schedule, compile=True, **args.options)
    done = time.perf_counter()
    return {"cache_dir": str(where), "import_s": imported - began, "model_s": built - imported,
            "evaluate_s": done - built, "process_s": done - began, "tpot_ms": result.tpot_ms,
            "counters": compile_cache.record()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.cache_dir and args.cache_dir.exists() and any(args.cache_dir.iterdir()):
        sys.exit(f"--cache-dir {args.cache_dir} is not empty: the first process must start without a cache")
    with tempfile.TemporaryDirectory(prefix="streamkv-compile-") as scratch:
        cache = args.cache_dir or Path(scratch) / "torch-compile"
        env = {**os.environ, "STREAMKV_COMPILE_CACHE": str(cache)}
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        command = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--engine", args.engine] + (
            ["--tiny"] if args.tiny else [])
        runs = []
        for k in range(args.processes):
            began = time.perf_counter()
            out = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
            runs.append({"process": k + 1, "wall_s": time.perf_counter() - began,
                         **json.loads(out.strip().splitlines()[-1])})
            print(f"process {k + 1}: {runs[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    import torch   # after the children: only to name the card
    summary = {"device": torch.cuda.get_device_name() if not args.tiny and torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items() if k != "child"},
               "runs": runs, "second_over_first_wall": runs[1]["wall_s"] / runs[0]["wall_s"] if len(runs) > 1 else None}
    text = json.dumps(summary, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
