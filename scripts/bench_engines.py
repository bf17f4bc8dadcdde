"""Wall time of the parallel engine vs token-by-token decoding, and their perplexity agreement.

GPU (the issue's benchmark; Pythia-2.8B architecture, random fp16 weights, cap 2048, 20k random tokens):
    python3 scripts/bench_engines.py --out bench_engines.json
CPU check at demo size (4-layer, 128-wide GPT-NeoX, cap 256, 4096 tokens, fp32):
    python3 scripts/bench_engines.py --tiny

For strict (S=4, W=cap−4, R=1) and lazy (same, R=--lazy-r) schedules in cache position mode:
- parallel: the whole stream, after one untimed warm-up pass (kernel selection, allocator growth),
  timed --repeats times with a device synchronize around each run; one row per --chunks value.
- decode: only a prefix (the prefill of `cap` tokens plus --decode-steps token steps), because the
  whole stream takes minutes. Its full-stream time is EXTRAPOLATED as ttft + tpot × (decode steps of the
  whole stream), with ttft/tpot from the decode engine's own CUDA-event timing; the JSON says so.
- agreement: parallel on that same prefix against decode's per-token NLL (fp16 rounding differs between
  the two, so this is a noise figure, not zero): max/mean abs per-token NLL diff and PPL relative diff.
Random weights cost exactly what real ones cost; the perplexities themselves mean nothing.
Every section is guarded: a failure is recorded in the JSON (and the rest still runs); the JSON is
rewritten after every section, so a crash leaves what was measured.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # runs from a bare checkout, no install needed

import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXConfig  # noqa: E402

from streamkv import compat, engines  # noqa: E402
from streamkv.metrics import perplexity  # noqa: E402
from streamkv.policies import PolicySpec, build_schedule  # noqa: E402

PYTHIA_CONFIG = REPO / "streamkv" / "configs" / "pythia-2.8b.json"
DEMO_CONFIG = REPO / "data" / "demo" / "config.json"
GPU_DEFAULTS = dict(tokens=20000, cap=2048, decode_steps=512, chunks="1024,2048,4096", lazy_r=64, dtype="float16")
TINY_DEFAULTS = dict(tokens=4096, cap=256, decode_steps=256, chunks="128,256,512", lazy_r=16, dtype="float32")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="demo-size model on the CPU (a quick check)")
    p.add_argument("--tokens", type=int, help="stream length (GPU 20000, tiny 4096)")
    p.add_argument("--cap", type=int, help="CAP_TOTAL (GPU 2048, tiny 256)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--lazy-r", type=int, help="R of the lazy schedule (GPU 64, tiny 16)")
    p.add_argument("--decode-steps", type=int, help="token steps decoded after the prefill (GPU 512, tiny 256)")
    p.add_argument("--chunks", help="comma-separated parallel chunk sizes (GPU 1024,2048,4096; tiny 128,256,512)")
    p.add_argument("--repeats", type=int, default=3, help="timed parallel runs per chunk size")
    p.add_argument("--position-mode", default="cache", choices=("cache", "absolute"))
    p.add_argument("--dtype", help="model dtype (GPU float16, tiny float32)")
    p.add_argument("--device", help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--out", type=Path, help="also write the JSON summary here")
    args = p.parse_args(argv)
    for key, value in (TINY_DEFAULTS if args.tiny else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.chunks = [int(c) for c in args.chunks.split(",")]
    args.device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    return args


def model_config(args):
    # --tiny: the committed demo model's architecture (scripts/train_demo_model.py); --config: any local
    # config.json (scripts/configs/ holds a Llama-3.2-3B-shaped one: grouped-query attention, head dim 128).
    config = getattr(args, "config", None)
    if config:
        return AutoConfig.from_pretrained(str(config))
    return GPTNeoXConfig.from_json_file(str(DEMO_CONFIG if args.tiny else PYTHIA_CONFIG))


def build_model(args):
    torch.manual_seed(0)
    with torch.device(args.device):   # initialise on the device: 2.8B parameters never touch the host
        model = AutoModelForCausalLM.from_config(model_config(args))
    return model.to(getattr(torch, args.dtype)).eval()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn):
    sync(device)
    began = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - began


def agreement(parallel_nll: torch.Tensor, decode_nll: torch.Tensor) -> dict:
    diff = (parallel_nll.double() - decode_nll.double()).abs()
    ppl_p, ppl_d = perplexity(parallel_nll)[0], perplexity(decode_nll)[0]
    return {"tokens": diff.numel(), "max_abs_nll_diff": diff.max().item(), "mean_abs_nll_diff": diff.mean().item(),
            "ppl_parallel": ppl_p, "ppl_decode": ppl_d, "ppl_rel_diff": abs(ppl_p - ppl_d) / ppl_d}


def guarded(record: dict, key: str, fn) -> None:
    """record[key] = fn(), or the error (and the traceback on stderr) if it fails."""
    try:
        record[key] = fn()
    except Exception as exc:   # noqa: BLE001 - one failing section must not cost the others' numbers
        traceback.print_exc()
        record[key] = {"error": f"{type(exc).__name__}: {exc}"}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()   # after an out-of-memory error, give the next section a clean pool


def bench_parallel(args, model, ids, schedule) -> dict:
    evaluate = engines.get("parallel").function
    rows = {}

    def one_chunk_size(chunk: int) -> dict:
        run = lambda: evaluate(model, ids, schedule, position_mode=args.position_mode, chunk_size=chunk)  # noqa: E731
        run()   # warm-up: kernel plans for every key length of the stream, allocator growth
        walls, result = [], None
        for _ in range(args.repeats):
            result, wall = timed(args.device, run)
            walls.append(wall)
        mean = statistics.fmean(walls)
        return {"wall_s": mean, "wall_s_std": statistics.pstdev(walls), "wall_s_runs": walls,
                "tokens_per_s": (ids.numel() - 1) / mean, "peak_memory_mb": result.peak_memory_mb,
                "ppl": perplexity(result.nll)[0]}

    for chunk in args.chunks:
        guarded(rows, str(chunk), lambda: one_chunk_size(chunk))
    timed_ok = [c for c in rows if "wall_s" in rows[c]]
    if not timed_ok:
        return {"chunks": rows}
    best = min(timed_ok, key=lambda c: rows[c]["wall_s"])
    return {"chunks": rows, "best_chunk": int(best), "best_wall_s": rows[best]["wall_s"]}


def bench_decode(args, model, ids, policy, full_schedule):
    """Decode a prefix; returns (JSON row, per-token NLL, the prefix schedule)."""
    evaluate = engines.get("decode").function
    n_prefix = min(ids.numel(), args.cap + args.decode_steps + 1)
    prefix = build_schedule(policy, n_prefix)
    warm = min(n_prefix, args.cap + 9)   # prefill + 8 steps: kernel plans and allocator growth
    evaluate(model, ids[:warm], build_schedule(policy, warm), position_mode=args.position_mode)
    result, wall = timed(args.device, lambda: evaluate(model, ids[:n_prefix], prefix,
                                                       position_mode=args.position_mode))
    steps_full = len(full_schedule.steps) - 1
    row = {"prefix_tokens": n_prefix, "decode_steps": len(prefix.steps) - 1, "wall_s": wall,
           "ttft_ms": result.ttft_ms, "tpot_ms": result.tpot_ms,
           "extrapolated_full_s": (result.ttft_ms + (result.tpot_ms or 0.0) * steps_full) / 1e3,
           "extrapolation": f"ttft + tpot x {steps_full} decode steps of the {ids.numel()}-token stream "
                            f"(measured: prefill + {len(prefix.steps) - 1} steps)",
           "peak_memory_mb": result.peak_memory_mb}
    return row, result.nll, prefix


def bench_case(args, model, ids, policy) -> dict:
    schedule = build_schedule(policy, ids.numel())
    case = {"policy": {"n_sink": policy.n_sink, "window": policy.window, "compress_every": policy.compress_every},
            "n_prunes": schedule.n_prunes, "max_visible": schedule.max_visible}
    guarded(case, "parallel", lambda: bench_parallel(args, model, ids, schedule))
    decoded = {}

    def decode_section() -> dict:
        row, decoded["nll"], decoded["schedule"] = bench_decode(args, model, ids, policy, schedule)
        return row

    def prefix_agreement() -> dict:
        prefix = decoded["schedule"]
        par = engines.get("parallel").function(model, ids[:prefix.n_tokens], prefix, position_mode=args.position_mode)
        return agreement(par.nll, decoded["nll"])

    guarded(case, "decode", decode_section)
    if decoded:
        guarded(case, "prefix_agreement", prefix_agreement)
    if "best_wall_s" in case["parallel"] and "extrapolated_full_s" in case["decode"]:
        case["speedup_parallel_vs_decode"] = case["decode"]["extrapolated_full_s"] / case["parallel"]["best_wall_s"]
    return case


def sdpa_probe(args, model) -> dict:
    """Which SDPA kernels accept the parallel engine's cache-mode call (Pythia: q/k head dim 80 + 20 → 104,
    v 80, boolean mask), and how fast each is at the default chunk. Informational."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg, dtype, rotary = model.config, getattr(torch, args.dtype), compat.rotary(model)
    heads, head = cfg.num_attention_heads, rotary.head_dim
    q_len = max(args.chunks)
    k_len = q_len + args.cap + args.lazy_r + args.sink
    qk_dim = head + rotary.rot_dims + (-(head + rotary.rot_dims) % 8)   # as the engine pads it
    gen = torch.Generator(args.device).manual_seed(0)
    q = torch.randn(1, heads, q_len, qk_dim, device=args.device, dtype=dtype, generator=gen)
    k = torch.randn(1, heads, k_len, qk_dim, device=args.device, dtype=dtype, generator=gen)
    v = torch.randn(1, heads, k_len, head, device=args.device, dtype=dtype, generator=gen)
    mask = torch.rand(q_len, k_len, device=args.device, generator=gen) < 0.5
    mask[:, 0] = True
    out = {}
    call = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                    SDPBackend.MATH, None):
        name = "default" if backend is None else backend.name
        try:
            with contextlib.nullcontext() if backend is None else sdpa_kernel([backend]):
                call()
                _, wall = timed(args.device, lambda: [call() for _ in range(5)])
            out[name] = {"ok": True, "ms_per_call": wall / 5 * 1e3}
        except Exception as exc:   # noqa: BLE001 - "not eligible" is an answer here
            out[name] = {"ok": False, "error": str(exc).splitlines()[0][:200]}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    summary = {"what": "parallel vs decode engine, random-weight model; decode full-stream time extrapolated "
                       "from a prefix (see decode.extrapolation)",
               "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else
               f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
               "torch": torch.__version__, "transformers": transformers.__version__, "dtype": args.dtype,
               "tokens": args.tokens, "cap": args.cap, "position_mode": args.position_mode,
               "chunks": args.chunks, "repeats": args.repeats, "cases": {}}

    def write() -> None:
        if args.out:
            args.out.write_text(json.dumps(summary, indent=1) + "\n")

    try:
        model = build_model(args)
    except Exception as exc:   # noqa: BLE001 - say why in the JSON too, then stop: nothing to measure
        summary["error"] = f"building the model failed: {type(exc).__name__}: {exc}"
        write()
        raise
    summary["model"] = {"layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
                        "heads": model.config.num_attention_heads, "vocab": model.config.vocab_size,
                        "params": sum(p.numel() for p in model.parameters())}
    ids = torch.randint(0, model.config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0))
    if args.device.startswith("cuda"):
        guarded(summary, "sdpa_probe", lambda: sdpa_probe(args, model))
        write()
    window = args.cap - args.sink
    cases = {"strict": PolicySpec(n_sink=args.sink, window=window, compress_every=1),
             f"lazy_r{args.lazy_r}": PolicySpec(n_sink=args.sink, window=window, compress_every=args.lazy_r)}
    for name, policy in cases.items():
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        guarded(summary["cases"], name, lambda: bench_case(args, model, ids, policy))
        write()
    if not args.tiny:
        summary["goals"] = {name: {"parallel_le_2s": c.get("parallel", {}).get("best_wall_s", math.inf) <= 2.0,
                                   "speedup_ge_100x": c.get("speedup_parallel_vs_decode", 0.0) >= 100}
                            for name, c in summary["cases"].items()}
    print(json.dumps(summary, indent=1))
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
