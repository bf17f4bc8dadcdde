"""scripts/probe_gemv.py's Triton GEMV: the float64 product on every tile size it times, and compiled for an
H100 ahead of time, so a device call spent on the probe does not end in a compile error. Under Triton's
interpreter on a CPU (`make test-flash-decode`), or on a GPU."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:
    triton = None
if triton is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 with Triton installed: `make test-flash-decode`",
                allow_module_level=True)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import probe_gemv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def test_gemv_is_the_float64_product_on_every_tile_size():
    assert probe_gemv.check(DEVICE)["max_abs_diff_float64"] <= 1e-9


def test_a_gemv_that_drops_a_tile_is_caught(monkeypatch):
    """check() would pass a kernel that reads the input only in part if its shapes had no ragged tile."""
    whole = probe_gemv.gemv
    monkeypatch.setattr(probe_gemv, "gemv", lambda x, w, b, *tile: whole(x[:-1], w[:, :-1], b, *tile))
    with pytest.raises(SystemExit, match="misses the float64 product"):
        probe_gemv.check(DEVICE)


COMPILE_FOR_HOPPER = textwrap.dedent("""
    import itertools, sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sys.path.insert(0, sys.argv[1])
    import probe_gemv as p
    for block_n, block_k, num_warps in itertools.product(*p.GRID.values()):
        constexprs = {"BLOCK_N": block_n, "BLOCK_K": block_k, "WORK": tl.float32}
        signature = {name: "constexpr" if name in constexprs else
                     ("*fp16" if name.endswith("_ptr") else "i32") for name in p._gemv.arg_names}
        compiled = triton.compile(ASTSource(fn=p._gemv, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert compiled.asm["cubin"], (block_n, block_k, num_warps)
        print(block_n, block_k, num_warps, "ok")
""")


def test_gemv_compiles_for_hopper_on_every_tile_size():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER, str(SCRIPTS)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(" ok") == len(list(itertools.product(*probe_gemv.GRID.values())))
