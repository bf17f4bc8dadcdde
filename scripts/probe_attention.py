"""Can the split-KV decode attention (streamkv/engines/flash_decode.py) beat SDPA with another launch? Each
decode shape timed with SDPA and with flash_decode at every launch tile of GRID, against its byte floor.

    python3 scripts/probe_attention.py --out probe_attention.json        # GPU: the shapes below, fp16
    TRITON_INTERPRET=1 python3 scripts/probe_attention.py --check         # CPU: every tile against float64

Why: the step's profile (docs/bench/h100_profile_step_sdpa.json) puts the decode attention at 2.18x its
K/V floor (cuDNN's kernel and a reduction: 15 µs a layer against 6.9), the second largest gap after the
GEMVs; flash_decode at its first tile (64 slots, 512 programs, 4 warps) ran 20.6 µs alone, at 128 slots
and 2 warps 13.3 µs (flash_decode.TILE now). With so few slots a program, latency, not bandwidth, may bound
it: the grid varies the slots per tile, the programs per call, the warps and the pipeline stages. Per
shape (heads, KV heads, slots, head dim): every layer's own K/V (together they exceed the L2 cache, as in
the step) attended in a row, captured in one CUDA graph, replayed; reported per layer: µs, the floor (K
and V read once at the copy bandwidth measured in the same process) and the ratio; the best tile per shape
first; and each kernel's largest miss against float64 SDPA on the same fp16 inputs (over FP16_MISS stops
the probe: a tile that drops slots is no candidate). Stop 29's probe timed flash_decode as two kernels; it
is one since (its module doc).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # runs from a bare checkout, no install needed

from profile_decode import copy_bandwidth, timed_replays  # noqa: E402  (same folder: the profile's timers)
from streamkv.engines import fast, flash_decode  # noqa: E402

# (heads, kv heads, slots, head dim): Pythia-2.8B at cap 2048 and 4096, the Llama-3.2-3B shape at 2048.
SHAPES = {"pythia-2.8b": (32, 32, 2048, 80), "pythia-2.8b-cap4096": (32, 32, 4096, 80),
          "llama-3.2-3b-gqa": (24, 8, 2048, 128)}
LAYERS = 32
# fp16 outputs of attention over random unit-variance values are below ~4 in magnitude, where an fp16 ulp is
# 2e-3; a tile that loses a chunk or a tile of slots misses by ~1e-1.
FP16_MISS = 1e-2
# Stop 29's grid (32-128 slots, 2-8 warps) found the most slots and the fewest warps best on every shape
# (h100_probe_attention.json); this one moves one step further along both.
GRID = {"BLOCK_N": (64, 128, 256), "programs": (256, 512, 1024), "num_warps": (1, 2, 4), "num_stages": (2, 3)}


def tiles() -> list[dict]:
    return [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]


def inputs(heads: int, kv_heads: int, slots: int, dim: int, dtype, device: str, seed: int = 0):
    """Query [1, H, 1, D], K/V [1, Hkv, C, D] and an additive mask [1, C] hiding a lazy schedule's gap."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, dim, generator=g, dtype=torch.float64).to(device, dtype)
               for h, n in ((heads, 1), (kv_heads, slots), (kv_heads, slots)))
    mask = torch.zeros(1, slots, dtype=dtype, device=device)
    mask[:, slots // 2: slots // 2 + 64] = float("-inf")
    return q, k, v, mask


def check(device: str, shapes: dict) -> dict:
    """Every tile against float64 SDPA on each shape (float64 inputs); raises past float64 rounding."""
    worst = 0.0
    for shape in shapes.values():
        q, k, v, mask = inputs(*shape, torch.float64, device)
        exact = fast.DECODE_ATTENTION["sdpa"](q, k, v, mask, 0.1)
        for tile in tiles():
            worst = max(worst, (flash_decode.attend(q, k, v, mask, 0.1, tile) - exact).abs().max().item())
    if worst > 1e-9:
        raise SystemExit(f"flash_decode misses float64 SDPA by {worst:.2e}")
    return {"max_abs_diff_float64": worst}


def time_shape(shape: tuple, bandwidth: float, replays: int) -> dict:
    """µs per layer of SDPA and of every tile on LAYERS layers' own fp16 buffers, against the K/V floor."""
    layers = [inputs(*shape, torch.float16, "cuda", seed=layer) for layer in range(LAYERS)]
    scaling = shape[3] ** -0.5
    k = layers[0][1]
    floor_us = 2 * k.numel() * k.element_size() / bandwidth * 1e6
    # What every kernel should return for layer 0: SDPA in float64 on the same fp16 inputs.
    reference = fast.DECODE_ATTENTION["sdpa"](*(x.double() for x in layers[0]), scaling)

    def miss(attend) -> float:
        return (attend(*layers[0], scaling).double() - reference).abs().max().item()

    def per_layer(attend) -> float:
        def every_layer():
            for q, k, v, mask in layers:
                attend(q, k, v, mask, scaling)
        return timed_replays(fast._capture(every_layer), replays) / LAYERS

    sdpa = fast.DECODE_ATTENTION["sdpa"]
    sdpa_us = per_layer(sdpa)
    rows = []
    for tile in tiles():
        attend = lambda *a, tile=tile: flash_decode.attend(*a, tile)   # noqa: E731
        us = per_layer(attend)
        rows.append({**tile, "us_per_layer": us, "over_floor": us / floor_us, "max_abs_diff_float64": miss(attend)})
    rows.sort(key=lambda r: r["us_per_layer"])
    return {"shape": dict(zip(("heads", "kv_heads", "slots", "head_dim"), shape)), "floor_us_per_layer": floor_us,
            "sdpa": {"us_per_layer": sdpa_us, "over_floor": sdpa_us / floor_us, "max_abs_diff_float64": miss(sdpa)},
            "flash_decode_default": next(r for r in rows if all(r[k] == v for k, v in flash_decode.TILE.items())),
            "flash_decode_best": rows[0], "flash_decode_grid": rows}


@torch.inference_mode()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check every tile against float64 (CPU: under "
                   "TRITON_INTERPRET=1, on small shapes)")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.check:
        small = {"pythia-like": (4, 4, 300, 80), "gqa": (4, 2, 200, 16)}
        print(json.dumps(check("cuda" if torch.cuda.is_available() else "cpu", small)))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("probe_attention.py times CUDA kernels: it needs a GPU (or --check under the interpreter)")
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "grid": GRID}
    record["copy_TBps"] = copy_bandwidth("cuda") / 1e12
    record["shapes"] = {}
    for name, shape in SHAPES.items():   # written after each shape: a run stopped early keeps the rest
        record["shapes"][name] = row = time_shape(shape, record["copy_TBps"] * 1e12, args.replays)
        best = row["flash_decode_best"]
        print(f"{name}: floor {row['floor_us_per_layer']:.1f} µs, sdpa {row['sdpa']['us_per_layer']:.1f} "
              f"({row['sdpa']['over_floor']:.2f}x), flash default {row['flash_decode_default']['us_per_layer']:.1f}, "
              f"best {best['us_per_layer']:.1f} ({best['over_floor']:.2f}x) at "
              f"{ {k: best[k] for k in GRID} }", flush=True)
        if args.out:
            args.out.write_text(json.dumps(record, indent=1) + "\n")
        worst = max(r["max_abs_diff_float64"] for r in row["flash_decode_grid"])
        if worst > FP16_MISS:
            raise SystemExit(f"{name}: a tile misses float64 SDPA by {worst:.2e} (fp16 rounding is under "
                             f"{FP16_MISS}): see flash_decode_grid in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
