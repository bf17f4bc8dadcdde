"""Where the fast engine's decode step spends its time: kernels of one replayed step, by kind, against floors.

    python3 scripts/profile_decode.py --out profile.json          # GPU: Pythia-2.8B shape, random fp16 weights

Builds the fast engine's ring buffer and step for a strict Start+Recent schedule (every step evicts; the
captured graph is the same for every schedule, only its counters differ), prefills `cap` tokens, captures the
compiled step as the engine does, then replays it: --steps replays timed with CUDA events, and --profiled
replays under torch.profiler. Each kernel is put in one kind by its name (KINDS): matmul (the weight GEMVs
and the LM head), attention, fused element-wise (Inductor's Triton kernels), and copies / other. Per kind:
microseconds per step, kernels per step, and for matmul and attention the floor, their bytes over the copy
bandwidth measured in the same process (weights; K and V of every layer's buffer).

--decode-attention picks the step's attention (fast.DECODE_ATTENTION; the `flash` kernels' names say
flash_decode, so they count as attention). The script also times every decode attention alone
(`attention_alone`): one layer's query against its own `cap`-slot K/V, all layers in one captured graph
(their buffers exceed the L2 cache, as in the step), against reading K and V once.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch._inductor import config as inductor_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # runs from a bare checkout, no install needed

from bench_engines import build_model  # noqa: E402  (same folder: one model builder)
from streamkv import compile_cache  # noqa: E402
from streamkv.engines import fast  # noqa: E402
from streamkv.engines.attention import swapped_attention  # noqa: E402
from streamkv.policies import PolicySpec, build_schedule  # noqa: E402

# First match wins; names are lower-cased. cuBLAS/CUTLASS GEMV and GEMM kernels, SDPA's backends, Inductor.
KINDS = (("attention", ("fmha", "flash", "attention", "cudnn", "sdpa")),
         ("matmul", ("gemv", "gemm", "xmma", "cutlass", "cublas", "sm90_", "sm80_")),
         ("fused element-wise", ("triton",)),
         ("copies / other", ("",)))


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next(kind for kind, keys in KINDS if any(k in name for k in keys))


def copy_bandwidth(device: str, n_bytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes per second a device-to-device copy moves (read + write), as the workplace anchor measures."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * n_bytes * repeats / (start.elapsed_time(end) / 1e3)


def attention_alone(cfg, cap: int, bandwidth: float, replays: int = 50) -> dict:
    """µs per layer of each decode attention of the fast engine, compiled as the step compiles it, over every
    layer's own buffers in one CUDA graph, and that time over the floor of reading the layer's K and V."""
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers, options = cfg.num_hidden_layers, dict(device="cuda", dtype=torch.float16)
    query = [torch.randn(1, heads, 1, dim, **options) for _ in range(layers)]
    k = [torch.randn(1, kv_heads, cap, dim, **options) for _ in range(layers)]
    v = [torch.randn(1, kv_heads, cap, dim, **options) for _ in range(layers)]
    mask = torch.zeros(1, cap, **options)
    mask[:, cap // 2: cap // 2 + 64] = float("-inf")        # the gap a lazy schedule leaves, say
    floor_us = 2 * k[0].numel() * k[0].element_size() / bandwidth * 1e6
    out = {}
    for name, attend in fast.DECODE_ATTENTION.items():
        attend = torch.compile(attend, dynamic=False)

        def every_layer(attend=attend):
            for layer in range(layers):
                attend(query[layer], k[layer], v[layer], mask, dim ** -0.5)
        us = timed_replays(fast._capture(every_layer), replays) / layers
        out[name] = {"us_per_layer": us, "floor_us_per_layer": floor_us, "over_floor": us / floor_us}
    return out


def captured_step(model, ids: torch.Tensor, cap: int, sink: int, decode_attention: str, linear: str):
    """The engine's CUDA graph and stream (its `nll` fills as it replays) for strict Start+Recent, prefilled
    and ready to replay."""
    schedule = build_schedule(PolicySpec(n_sink=sink, window=cap - sink, compress_every=1), ids.numel())
    plan = fast.check_supported(schedule, "cache", "exact")
    ring = fast._Ring(model, ids, plan, "cache", decode_attention)
    nll = torch.zeros(ring.rows, device=next(model.parameters()).device)
    stream = fast._Stream(model, ring, schedule.prefill_len, nll, torch.float32, linear)
    fast._Active.ring = ring
    stream.prefill()
    graph = fast._capture(compile_cache.compiled(stream.step))
    stream.prefill()
    return graph, stream


def timed_replays(graph, n: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / n   # µs per step


def kernel_table(run, n: int) -> list[dict]:
    """The kernels of `n` calls of `run` (a graph's replay, a forward), per call, slowest first."""
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(n):
            run()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us > 0 and event.count:
            rows.append({"kernel": event.key, "kind": kind_of(event.key), "us_per_step": us / n,
                         "calls_per_step": event.count / n})
    return sorted(rows, key=lambda r: -r["us_per_step"])


def floors(model, cap: int, bandwidth: float) -> dict:
    """µs per step that reading each kind's bytes once takes: every weight but the input embedding (one row
    is read) for the matmuls, K and V of every layer's `cap`-slot buffer for attention."""
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_in" not in n)
    kv_bytes = 2 * cfg.num_hidden_layers * cap * cfg.hidden_size * next(model.parameters()).element_size()
    return {"matmul": weight_bytes / bandwidth * 1e6, "attention": kv_bytes / bandwidth * 1e6,
            "weight_bytes": weight_bytes, "kv_bytes": kv_bytes}


@torch.inference_mode()   # as the engine's evaluate: no autograd state for the compiled step to trace
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cap", type=int, default=2048)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--steps", type=int, default=400, help="replays timed with CUDA events")
    p.add_argument("--profiled", type=int, default=50, help="replays under torch.profiler")
    p.add_argument("--top", type=int, default=25, help="kernels listed one by one")
    p.add_argument("--decode-attention", default="sdpa", choices=tuple(fast.DECODE_ATTENTION))
    p.add_argument("--linear", default=fast.default_linear(torch.device("cuda")), choices=tuple(fast.LINEARS),
                   help="the step's one-row linears (fast.LINEARS; default: the engine's on CUDA; the `triton` "
                   "GEMV's kernel is named _gemv and counts as matmul)")
    p.add_argument("--stream", type=int, default=2561, help="stream length (tokens): by default bench_decode.py's "
                   "(cap + steps + 1), so both compile the step for the same buffer shapes")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode.py profiles the CUDA graph of the fast engine: it needs a GPU")
    model = build_model(argparse.Namespace(tiny=False, device="cuda", dtype="float16"))
    n_tokens = max(args.stream, args.cap + args.steps + args.profiled + 2 * fast.GRAPH_WARMUP_STEPS + 8)
    ids = torch.randint(0, model.config.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(0))
    with swapped_attention(model, fast.ATTN_IMPLEMENTATION, "fast"):
        try:
            graph, _ = captured_step(model, ids, args.cap, args.sink, args.decode_attention, args.linear)
            step_us = timed_replays(graph, args.steps)
            kernels = kernel_table(graph.replay, args.profiled)
        finally:
            fast._Active.ring = None
    bandwidth = copy_bandwidth("cuda")
    by_kind = defaultdict(lambda: {"us_per_step": 0.0, "calls_per_step": 0.0})
    for row in kernels:
        by_kind[row["kind"]]["us_per_step"] += row["us_per_step"]
        by_kind[row["kind"]]["calls_per_step"] += row["calls_per_step"]
    floor = floors(model, args.cap, bandwidth)
    for kind in ("matmul", "attention"):
        by_kind[kind]["floor_us"] = floor[kind]
        by_kind[kind]["over_floor"] = by_kind[kind]["us_per_step"] / floor[kind]
    kernel_us = sum(r["us_per_step"] for r in kernels)
    alone = attention_alone(model.config, args.cap, bandwidth)
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "args": vars(args) | {"out": None},
               "coordinate_descent_tuning": inductor_config.coordinate_descent_tuning,
               "copy_TBps": bandwidth / 1e12, "step_us": step_us, "kernel_us": kernel_us,
               "gaps_us": step_us - kernel_us, "floor_us": floor["matmul"] + floor["attention"],
               "layers": model.config.num_hidden_layers, "by_kind": dict(by_kind), "attention_alone": alone,
               "top_kernels": kernels[:args.top]}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    # The console gets the per-kind table; the kernel list is in --out.
    print(f"{summary['device']}: {step_us:.1f} µs a step, kernels {kernel_us:.1f} µs, "
          f"floor {summary['floor_us']:.1f} µs")
    for kind, row in by_kind.items():
        floor_note = f", {row['over_floor']:.2f}x its floor" if "over_floor" in row else ""
        print(f"  {kind:20s} {row['us_per_step']:8.1f} µs  {row['calls_per_step']:6.1f} kernels{floor_note}")
    for name, row in alone.items():
        print(f"  attention {name:10s} alone: {row['us_per_layer']:.1f} µs a layer, "
              f"{row['over_floor']:.2f}x its floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
