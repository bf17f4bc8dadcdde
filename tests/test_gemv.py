"""The fast engine's Triton GEMV (engines/gemv.py): the float64 product on every tile the probe times, with
and without a bias, with the layer norm, activation and residuals it can fold in; and compiled for an H100
ahead of time. Under Triton's interpreter on a CPU (`make test-flash-decode`), or on a GPU. How the model's
calls reach it: tests/test_gemv_fusion.py."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from streamkv.engines import gemv
from triton_kernels import DEVICE, skip_module_without_triton

skip_module_without_triton()

from test_engines import max_diff  # noqa: E402

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import probe_gemv  # noqa: E402


def test_kernel_is_the_float64_product_on_every_tile_the_probe_times():
    assert probe_gemv.check(DEVICE)["max_abs_diff_float64"] <= 1e-9


def test_a_kernel_that_drops_a_column_is_caught(monkeypatch):
    """check() would pass a kernel that read the input only in part if its shapes had no ragged tile."""
    whole = gemv.linear
    monkeypatch.setattr(gemv, "linear", lambda x, w, b, shape: whole(x[:-1], w[:, :-1], b, shape))
    with pytest.raises(SystemExit, match="misses the float64 product"):
        probe_gemv.check(DEVICE)


@pytest.mark.parametrize("n_out, n_in", [(37, 300), (2560, 2560)])   # the default tile; one of TILES
def test_linear_without_a_bias_and_with_leading_dims(n_out, n_in):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 1, n_in, generator=g, dtype=torch.float64), torch.randn(n_out, n_in, generator=g,
                                                                                  dtype=torch.float64)
    got = gemv.linear(x.to(DEVICE), w.to(DEVICE)).cpu()
    assert got.shape == (1, 1, n_out) and max_diff(got, x @ w.T) <= 1e-9


# Every fold at a shape with one ragged tile (the default tile), and all of them at once at a shape of TILES.
FOLDS = [(37, 300, activation, normed, residuals) for activation in (gemv.NO_ACTIVATION, *gemv.ACTIVATIONS.values())
         for normed in (False, True) for residuals in range(gemv.MAX_RESIDUALS + 1)] + [(2560, 2560, 1, True, 2)]


@pytest.mark.parametrize("n_out, n_in, activation, normed, residuals", FOLDS)
def test_linear_is_the_float64_composition_of_what_it_folds_in(n_out, n_in, activation, normed, residuals):
    """norm, product, activation, residuals, in that order. The row is far from zero mean, so a kernel that
    skipped the norm's centring, or its eps, misses by far more than the bound."""
    g = torch.Generator().manual_seed(4)
    x = 5 * torch.randn(1, 1, n_in, generator=g, dtype=torch.float64) + 3
    w, b, weight, bias = (torch.randn(*shape, generator=g, dtype=torch.float64)
                          for shape in ((n_out, n_in), (n_out,), (n_in,), (n_in,)))
    added = [torch.randn(1, 1, n_out, generator=g, dtype=torch.float64) for _ in range(residuals)]
    norm = gemv.Norm(weight.to(DEVICE), bias.to(DEVICE), 1e-5) if normed else None
    got = gemv.linear(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), activation=activation, norm=norm,
                      residuals=[r.to(DEVICE) for r in added]).cpu()
    function = {v: f for f, v in gemv.ACTIVATIONS.items()}.get(activation, lambda y: y)
    want = function(F.linear(F.layer_norm(x, (n_in,), weight, bias, 1e-5) if normed else x, w, b)) + sum(added)
    assert max_diff(got, want) <= 1e-9


def test_more_residuals_than_the_kernel_adds_are_refused():
    x, w = torch.randn(1, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="at most 2 residuals"):
        gemv.linear(x, w, residuals=[torch.zeros(1, 3, dtype=torch.float64)] * 3)


# Ahead-of-time compile for sm_90, in a process without TRITON_INTERPRET (under it, kernels are not compiled):
# fp16 tensors (fp32 work) and float64 ones (float64 work); with and without a bias; every tile the engine or
# the probe launches; the engine's also with every activation, with and without a norm, and with two residuals.
COMPILE_FOR_HOPPER = textwrap.dedent("""
    import itertools, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from streamkv.engines import gemv
    sys.path.insert(0, sys.argv[1])
    import probe_gemv
    engine = set(gemv.TILES.values()) | {gemv.DEFAULT_TILE}
    tiles = engine | set(itertools.product(*probe_gemv.GRID.values()))
    for (block_n, block_k, num_warps), io, bias in itertools.product(sorted(tiles), ("fp16", "fp64"), (True, False)):
        # The probe times plain products; the engine's tiles also run with every activation, a norm or none,
        # and residuals (the most the kernel adds: the code with fewer is a subset).
        fused = (block_n, block_k, num_warps) in engine
        for activation, norm in itertools.product([0, *gemv.ACTIVATIONS.values()] if fused else [0],
                                                  (False, True) if fused else (False,)):
            constexprs = {"BLOCK_N": block_n, "BLOCK_K": block_k, "HAS_BIAS": bias, "ACTIVATION": activation,
                          "NORM": norm, "RESIDUALS": gemv.MAX_RESIDUALS if fused else 0}
            scalars = {"eps": "fp32"}
            signature = {name: "constexpr" if name in constexprs else scalars.get(name) or
                         ("*" + io if name.endswith("_ptr") else "i32") for name in gemv._gemv.arg_names}
            compiled = triton.compile(ASTSource(fn=gemv._gemv, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
            assert compiled.asm["cubin"], (block_n, block_k, num_warps, io, bias, activation, norm)
            print(block_n, block_k, num_warps, io, bias, activation, norm, "ok")
""")


def test_kernel_compiles_for_hopper_on_every_tile():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER, str(SCRIPTS)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    engine = set(gemv.TILES.values()) | {gemv.DEFAULT_TILE}
    tiles = engine | set(itertools.product(*probe_gemv.GRID.values()))
    fused = 2 * (1 + len(gemv.ACTIVATIONS))    # every activation, with and without a norm
    assert done.stdout.count(" ok") == 4 * (len(tiles) - len(engine) + fused * len(engine))
