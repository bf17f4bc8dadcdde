"""The fast engine's Triton decode attention (engines/flash_decode.py) against float64 SDPA and the reference.

Triton compiles for a GPU; on a CPU it runs under its interpreter (TRITON_INTERPRET=1, numpy underneath),
which executes the same kernel source program by program. `make test-flash-decode` (part of `make test`)
runs this file so, with Triton from requirements-triton.lock in its own folder: the CPU torch wheel ships
no Triton, and the image's locks stay as they are. Elsewhere (a plain `pytest` without Triton) the module
is skipped with that reason. On a CUDA machine the kernels run compiled, on the GPU.

The interpreter forgives what the GPU compiler refuses (types, shapes), so the kernels are also compiled
here, ahead of time, for an H100 (sm_90) with Triton's own ptxas: no GPU needed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from streamkv.engines import fast, flash_decode
from triton_kernels import DEVICE, skip_module_without_triton

skip_module_without_triton()

from bounds import BROKEN, EXACT  # noqa: E402
from test_engines import CASES, max_diff  # noqa: E402
from test_fast import run_fast_on, run_reference  # noqa: E402


def inputs(heads, kv_heads, slots, dim, hidden, seed=0):
    """float64 query [1, H, 1, D], K/V [1, Hkv, C, D] and an additive mask hiding the slots in `hidden`."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, dim, generator=g, dtype=torch.float64)
               for h, n in ((heads, 1), (kv_heads, slots), (kv_heads, slots)))
    mask = torch.zeros(1, slots, dtype=torch.float64)
    mask[:, hidden] = float("-inf")
    return [x.to(DEVICE) for x in (q, k, v, mask)]


# (heads, kv heads, slots, head dim, hidden slots): chunk counts that are not powers of two (padding
# chunks), a last tile cut short, grouped heads, whole chunks that see nothing, one slot seen.
SHAPES = {"pythia-like": (8, 8, 300, 80, slice(100, 200)),
          "gqa": (8, 2, 200, 16, slice(0, 150)),
          "one-chunk": (4, 4, 40, 128, slice(10, 20)),
          "one-slot-seen": (2, 2, 257, 32, slice(1, None))}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_kernel_is_sdpa_in_float64(shape):
    heads, kv_heads, slots, dim, hidden = SHAPES[shape]
    q, k, v, mask = inputs(heads, kv_heads, slots, dim, hidden)
    assert flash_decode.n_splits(heads, slots) >= (2 if slots > flash_decode.TILE["BLOCK_N"] else 1)
    got = flash_decode.attend(q, k, v, mask, 0.3)
    assert got.shape == q.shape and got.dtype == torch.float64
    assert max_diff(got, fast.DECODE_ATTENTION["sdpa"](q, k, v, mask, 0.3)) <= EXACT


# Launches scripts/probe_attention.py times: tiles other than the default's, one to a few chunks per head.
TILES = ({"BLOCK_N": 32, "programs": 8, "num_warps": 2, "num_stages": 2},
         {"BLOCK_N": 128, "programs": 64, "num_warps": 8, "num_stages": 4},
         {"BLOCK_N": 16, "programs": 1, "num_warps": 1, "num_stages": 1})


@pytest.mark.parametrize("tile", TILES, ids=lambda t: "-".join(map(str, t.values())))
def test_every_launch_tile_is_sdpa_in_float64(tile):
    heads, kv_heads, slots, dim, hidden = SHAPES["pythia-like"]
    q, k, v, mask = inputs(heads, kv_heads, slots, dim, hidden)
    got = flash_decode.attend(q, k, v, mask, 0.3, tile)
    assert max_diff(got, fast.DECODE_ATTENTION["sdpa"](q, k, v, mask, 0.3)) <= EXACT


def test_the_counters_are_zero_between_calls():
    """The last program of each head combines and sets its counter back to zero (module doc): so a second
    call, as a CUDA graph's replay, combines again and gives the same output."""
    heads, kv_heads, slots, dim, hidden = SHAPES["pythia-like"]
    q, k, v, mask = inputs(heads, kv_heads, slots, dim, hidden)
    first = flash_decode.attend(q, k, v, mask, 0.3)
    assert not flash_decode.counters(q.device, heads).any()
    assert torch.equal(flash_decode.attend(q, k, v, mask, 0.3), first)


def test_kernel_reads_the_mask():
    """Hiding one more slot moves the output: the comparison above would see a kernel that ignored the mask."""
    heads, kv_heads, slots, dim, _ = SHAPES["pythia-like"]
    q, k, v, mask = inputs(heads, kv_heads, slots, dim, slice(100, 200))
    k[..., 250, :] = 4 * q[0, 0, 0]   # a slot the query attends to strongly
    masked = mask.clone()
    masked[:, 250] = float("-inf")
    assert max_diff(flash_decode.attend(q, k, v, masked, 0.3), flash_decode.attend(q, k, v, mask, 0.3)) > BROKEN


@pytest.mark.parametrize("case", ["strict", "lazy_drop", "lazy_drop_r5"])
@pytest.mark.parametrize("model_name", ["gpt_neox", "llama"])
def test_fast_engine_with_flash_decode_matches_reference(model_name, case):
    """The whole engine, eager, with this attention in every decode step: equal to the float64 reference."""
    assert case in CASES
    got = run_fast_on(DEVICE, model_name, case, graph=False, compile=False, decode_attention="flash")
    assert max_diff(got.nll, run_reference(model_name, case, "cache").nll) <= EXACT


# Ahead-of-time compile for sm_90, in a process without TRITON_INTERPRET (under it, kernels are not
# compiled). Argument types follow `attend`: fp16/bf16/fp32 tensors with fp32 work, float64 with float64;
# `scaling` as Triton types a Python float (fp32) and as Inductor passes it inside a compiled graph (fp64:
# so typed, the kernel (then its partials kernel) failed to compile on an H200 until its scores were cast to the
# work dtype).
COMPILE_FOR_HOPPER = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from streamkv.engines import flash_decode as fd
    ints = dict.fromkeys(["slots", "chunk", "dim", "group", "stride_qh", "stride_kh", "stride_kn", "stride_vh",
                          "stride_vn", "stride_oh"], "i32")
    constexprs = {"SPLITS": 16, "BLOCK_N": fd.TILE["BLOCK_N"], "BLOCK_D": 128}
    for io, work in (("fp16", "fp32"), ("bf16", "fp32"), ("fp32", "fp32"), ("fp64", "fp64")):
        types = {"q": io, "k": io, "v": io, "mask": io, "out": io, "m_out": work, "l_out": work, "acc_out": work,
                 "counters": "i32"}
        for scaling in ("fp32", "fp64"):
            signature = {name: "constexpr" if name in constexprs else ints.get(name) or
                         (scaling if name == "scaling" else "*" + types[name]) for name in fd._flash_decode.arg_names}
            compiled = triton.compile(ASTSource(fn=fd._flash_decode, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": fd.TILE["num_warps"]})
            assert compiled.asm["cubin"], (io, scaling)
            print(io, scaling, "ok")
""")


def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(" ok") == 8
