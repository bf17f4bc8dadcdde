"""Can a GEMV of our own beat cuBLAS on the decode step's one-row linears? Each of Pythia-2.8B's linear shapes
(the LM head's too) timed three ways against its byte floor.

    python3 scripts/probe_gemv.py --out probe_gemv.json      # GPU: the four linear shapes, fp16
    TRITON_INTERPRET=1 python3 scripts/probe_gemv.py --check  # CPU: the Triton kernel against float64

Why: the profile of the captured step (docs/bench/h100_profile_step_sdpa.json) puts the linears at 1.26x
their byte floor (cuBLASLt's nvjet kernels; 457 µs a step over it), and the engine's probes found that
neither cuBLAS without Lt nor Inductor's coordinate-descent GEMVs is faster end to end. This times, per
shape [out, in] with a bias: `cublas` (F.linear, as the engine runs it by default), `triton`
(streamkv/engines/gemv.py at every point of GRID, the best reported; its TILES are this probe's best) and
`inductor` (F.linear under torch.compile with coordinate-descent tuning: Inductor's generated
multiply-and-sum). Each is 32 layers' distinct weights in a row (as in the step: together they exceed the L2
cache), captured in one CUDA graph, replayed; reported per call: µs, the floor (weight, bias, input and
output bytes over the copy bandwidth measured in the same process) and the ratio, and the largest
difference from cuBLAS's output (fp16 noise). Before timing, the kernel is checked against float64 on the GPU
at every grid point. For the shapes a layer norm feeds (NORMED), `engine_tile` and `triton_norm` time the
kernel with the norm inside (the fast engine's linear="triton_fused") beside the norm as a kernel of its own.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # runs from a bare checkout, no install needed

import triton  # noqa: E402
from profile_decode import copy_bandwidth, timed_replays  # noqa: E402  (same folder: the profile's timers)
from streamkv.engines import fast, gemv  # noqa: E402

# [out, in]: each layer's four linears, and the LM head (one call a step; 32 copies here like the rest, so
# its µs per call compare), which linear="triton" also takes, with DEFAULT_TILE.
SHAPES = {"qkv": (7680, 2560), "dense": (2560, 2560), "fc1": (10240, 2560), "fc2": (2560, 10240),
          "lm_head": (50304, 2560)}
# The shapes a layer norm feeds (GPT-NeoX's query_key_value and dense_h_to_4h): also timed with the norm in
# the kernel (linear="triton_fused"), at the engine's tile and the grid's best, beside the norm alone.
NORMED = ("qkv", "fc1")
LAYERS = 32
GRID = {"block_n": (1, 2, 4, 8), "block_k": (256, 512, 1024), "num_warps": (2, 4, 8)}


def check(device: str) -> dict:
    """The kernel on every grid point against a float64 product, at shapes whose edges are ragged (rows and
    columns past the last whole tile); raises if it misses by more than float64 rounding."""
    worst = 0.0
    g = torch.Generator().manual_seed(0)
    for n_out, n_in in ((37, 300), (64, 129)):
        x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((n_in,), (n_out, n_in), (n_out,)))
        exact = w @ x + b
        for block_n, block_k, num_warps in itertools.product(*GRID.values()):
            shape = {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": num_warps}
            got = gemv.linear(x.to(device), w.to(device), b.to(device), shape).cpu()
            worst = max(worst, (got - exact).abs().max().item())
    if worst > 1e-9:
        raise SystemExit(f"the Triton GEMV misses the float64 product by {worst:.2e}")
    return {"max_abs_diff_float64": worst}


def graph_us(call, calls: int, replays: int = 20) -> float:
    """µs per call of `call` (which makes `calls` calls), captured in a CUDA graph as the fast engine captures
    its step (warm-up on a side stream first: compilation, tuning, allocator), averaged over `replays`."""
    return timed_replays(fast._capture(call), replays) / calls


def fastest_tile(us_at) -> dict:
    """{"us": ..., BLOCK_N, BLOCK_K, num_warps} of the GRID point where `us_at(shape)` is least."""
    timed = []
    for block_n, block_k, num_warps in itertools.product(*GRID.values()):
        shape = {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": num_warps}
        timed.append({"us": us_at(shape), **shape})
    return min(timed, key=lambda point: point["us"])


def tile_of(point: dict) -> dict:
    return {key: point[key] for key in ("BLOCK_N", "BLOCK_K", "num_warps")}


def probe_shape(n_out: int, n_in: int, bandwidth: float, normed: bool = False) -> dict:
    options = dict(device="cuda", dtype=torch.float16)
    x = torch.randn(n_in, **options)
    w = [torch.randn(n_out, n_in, **options) / n_in ** 0.5 for _ in range(LAYERS)]
    b = [torch.randn(n_out, **options) for _ in range(LAYERS)]
    floor_us = 2 * (n_out * n_in + 2 * n_out + n_in) / bandwidth * 1e6

    def per_layer_us(call) -> float:   # outputs come from the graph's pool, as in the captured decode step
        return graph_us(lambda: [call(layer) for layer in range(LAYERS)], LAYERS)

    def us(linear) -> float:
        return per_layer_us(lambda layer: linear(x, w[layer], b[layer]))

    row = {"floor_us": floor_us, "cublas": {"us": us(lambda x, w, b: F.linear(x[None], w, b)[0])}}
    reference = F.linear(x[None], w[0], b[0])[0].float()
    row["triton"] = fastest_tile(lambda shape: us(lambda x, w, b: gemv.linear(x, w, b, shape)))
    diff = (gemv.linear(x, w[0], b[0], tile_of(row["triton"])).float() - reference).abs().max().item()
    row["triton"]["max_abs_diff_vs_cublas"] = diff
    if normed:
        # What the norm costs inside the kernel (every program computes the row's statistics), at the
        # engine's tile and at the grid's best for it, against what it costs as a kernel of its own (eager
        # F.layer_norm of one row; in the compiled step Inductor's reduction also adds the residual).
        norms = [gemv.Norm(torch.randn(n_in, **options), torch.randn(n_in, **options), 1e-5) for _ in range(LAYERS)]

        def with_norm_us(shape) -> float:
            return per_layer_us(lambda i: gemv.linear(x, w[i], b[i], shape, norm=norms[i]))

        engine = gemv.tile(n_out, n_in)
        row["engine_tile"] = {**engine, "plain_us": us(lambda x, w, b: gemv.linear(x, w, b, engine)),
                              "with_norm_us": with_norm_us(engine),
                              "norm_alone_us": per_layer_us(lambda i: F.layer_norm(x, (n_in,), *norms[i]))}
        row["triton_norm"] = fastest_tile(with_norm_us)
    # Last: its compile and tuning take the longest.
    row["inductor"] = {"us": us(torch.compile(lambda x, w, b: F.linear(x[None], w, b)[0], dynamic=False,
                                              options={"coordinate_descent_tuning": True}))}
    for name in ("cublas", "triton", "triton_norm", "inductor"):
        if name in row:
            row[name]["over_floor"] = row[name]["us"] / floor_us
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check the kernel against float64 (CPU under "
                   "TRITON_INTERPRET=1, or a GPU)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.check:
        record = check("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("probe_gemv.py times GPU kernels; on a CPU run --check under TRITON_INTERPRET=1")
        bandwidth = copy_bandwidth("cuda")
        record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "copy_TBps": bandwidth / 1e12, "layers": LAYERS, "check": check("cuda"), "shapes": {}}
        for name, shape in SHAPES.items():   # written after each shape: a run stopped early keeps the rest
            record["shapes"][name] = probe_shape(*shape, bandwidth, normed=name in NORMED)
            write(record, args.out)
    print(write(record, args.out))


def write(record: dict, out: Path | None) -> str:
    text = json.dumps(record, indent=1)
    if out:
        out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
