"""Where the recompute baseline's time goes: the kernels of one forward of B windows, by kind, against peak.

    python3 scripts/profile_recompute.py --batch 16 --out profile_recompute.json   # GPU: Pythia-2.8B shape, fp16

The baseline's decode phase is one call per B windows, compat.last_logits (streamkv/engines/recompute.py);
this profiles that call eager, as the engine runs it (--compiled: under torch.compile, with HF's SDPA
attention handed no mask, as eager: engines/recompute.py, unmasked_attention). Each kernel is put
in one kind by its name (profile_decode.KINDS): matmul (the GEMMs), attention (SDPA's flash / cuDNN
kernels), fused element-wise and copies / other (eager's element-wise kernels land here). Per kind:
microseconds per window, and for matmul and attention their FLOPs per window and the rate that makes,
beside the dense fp16 matmul rate measured in the same process (an 8192³ GEMM): the figure a recompute goal
is a fraction of. Why a profile and not a guess: issue 17's goal (18 ms a token) needs the whole forward
at about 610 TFLOP/s (11.0 TFLOP a window); this says which kind keeps it from that, and by how much.

FLOPs per window of C tokens: matmul 2 · C · (every layer's linear weights) + 2 · d · vocab (the LM head runs
on the last position only); attention 2 · layers · heads · C² · head_dim (QKᵀ and PV, each 2 · C² · dim,
halved by the causal mask).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # runs from a bare checkout, no install needed

from bench_engines import build_model, timed  # noqa: E402  (same folder: one model builder)
from profile_decode import kernel_table  # noqa: E402  (same folder: one kernel classifier)
from streamkv import compat, timing  # noqa: E402
from streamkv.engines.recompute import unmasked_attention  # noqa: E402


def matmul_rate(n: int = 8192, repeats: int = 20) -> float:
    """FLOP/s of a dense fp16 n³ GEMM on this card, the best of `repeats` (the attainable peak)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.float16) for _ in range(2))
    a @ b
    best = min(timed("cuda", lambda: a @ b)[1] for _ in range(repeats))
    return 2 * n ** 3 / best


def flops_per_window(model, cap: int) -> dict:
    cfg = model.config
    heads = cfg.num_attention_heads
    dim = cfg.hidden_size // heads
    layer_weights = sum(m.weight.numel() for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and ".layers." in name)
    lm_head = model.get_output_embeddings().weight.numel()
    return {"matmul": 2 * cap * layer_weights + 2 * lm_head,
            "attention": 2 * cfg.num_hidden_layers * heads * cap ** 2 * dim}


def sdpa_backends(forward, batch: int, repeats: int, device: str = "cuda") -> dict:
    """ms per window of the same forward with SDPA held to each fused backend (the default lets torch pick):
    the causal attention over head dim 80 is the one kernel family the engine could choose otherwise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                forward()   # its plans
                out[backend.name] = timing.summary(timed(device, forward)[1] * 1e3 / batch for _ in range(repeats))
        except RuntimeError as e:   # a backend that refuses the shape says so, in one line
            out[backend.name] = {"refused": str(e).splitlines()[0]}
    return out


@torch.inference_mode()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cap", type=int, default=2048, help="tokens per window")
    p.add_argument("--batch", type=int, default=16, help="windows per forward (the engine's recompute_batch)")
    p.add_argument("--repeats", type=int, default=5, help="forwards timed with CUDA events")
    p.add_argument("--profiled", type=int, default=2, help="forwards under torch.profiler")
    p.add_argument("--top", type=int, default=25, help="kernels listed one by one")
    p.add_argument("--compiled", action="store_true", help="profile the forward under torch.compile instead "
                   "(scripts/probe_recompute_compile.py found it slower; this says which kernels lose)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.cap < 1 or args.batch < 1 or args.repeats < 1 or args.profiled < 1:
        p.error("--cap, --batch, --repeats and --profiled must be at least 1")
    if not torch.cuda.is_available():
        raise SystemExit("profile_recompute.py profiles CUDA kernels: it needs a GPU")
    model = build_model(argparse.Namespace(tiny=False, device="cuda", dtype="float16"))
    windows = torch.randint(model.config.vocab_size, (args.batch, args.cap),
                            generator=torch.Generator().manual_seed(1)).to("cuda")
    forward = lambda: compat.last_logits(model, windows)   # noqa: E731  (the engine's call, eager)
    with contextlib.ExitStack() as compiling:
        if args.compiled:
            # Without a mask, as eager runs (recompute.unmasked_attention): HF's "sdpa" passes one when traced.
            compiling.enter_context(unmasked_attention(model))
            forward = torch.compile(forward, dynamic=False)
        forward()                                              # warm-up: cuBLAS / cuDNN plans, or the compile
        ms = timing.summary(timed("cuda", forward)[1] * 1e3 / args.batch for _ in range(args.repeats))
        # Held backends describe the eager call the engine makes; compiled, each would be a recompile.
        backends = {} if args.compiled else sdpa_backends(forward, args.batch, args.repeats)
        kernels = kernel_table(forward, args.profiled)
    peak = matmul_rate()
    flops = flops_per_window(model, args.cap)
    by_kind = defaultdict(lambda: {"us_per_window": 0.0, "kernels_per_forward": 0.0})
    for row in kernels:
        by_kind[row["kind"]]["us_per_window"] += row["us_per_step"] / args.batch
        by_kind[row["kind"]]["kernels_per_forward"] += row["calls_per_step"]
    for kind, n in flops.items():
        row = by_kind[kind]
        row["tflop_per_window"] = n / 1e12
        row["tflops"] = n / (row["us_per_window"] * 1e-6) / 1e12
        row["of_peak"] = row["tflops"] * 1e12 / peak
    total_flop = sum(flops.values())
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args) | {"out": None},
               "ms_per_window": ms, "kernel_ms_per_window": sum(r["us_per_window"]
                                                                                for r in by_kind.values()) / 1e3,
               "dense_fp16_peak_tflops": peak / 1e12, "tflop_per_window": total_flop / 1e12,
               "whole_forward_tflops": total_flop / (ms["median"] * 1e-3) / 1e12,
               "ms_per_window_at_peak": total_flop / peak * 1e3, "by_kind": dict(by_kind),
               "ms_per_window_by_sdpa_backend": backends,
               "top_kernels": kernels[:args.top]}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{summary['device']}: {summary['ms_per_window']['median']:.2f} ms a window "
          f"({summary['whole_forward_tflops']:.0f} TFLOP/s), kernels {summary['kernel_ms_per_window']:.2f} ms; "
          f"dense fp16 GEMM {summary['dense_fp16_peak_tflops']:.0f} TFLOP/s, "
          f"so {summary['ms_per_window_at_peak']:.2f} ms a window at that rate")
    for name, row in backends.items():
        print(f"  SDPA held to {name}: " + (f"{row['median']:.2f} ms a window" if "median" in row else row["refused"]))
    for kind, row in by_kind.items():
        rate = f", {row['tflops']:.0f} TFLOP/s ({row['of_peak']:.0%} of the GEMM's)" if "tflops" in row else ""
        print(f"  {kind:20s} {row['us_per_window'] / 1e3:7.2f} ms  {row['kernels_per_forward']:7.1f} kernels{rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
