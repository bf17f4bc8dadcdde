"""The fast engine's Triton GEMV (engines/gemv.py): the float64 product on every tile the probe times, with
and without a bias; routed to only for one-row linears; the whole engine with it against the float64
reference; and compiled for an H100 ahead of time. Under Triton's interpreter on a CPU (`make
test-flash-decode`), or on a GPU."""
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

if gemv.triton is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 with Triton installed: `make test-flash-decode`",
                allow_module_level=True)

from bounds import EXACT  # noqa: E402
from test_engines import max_diff  # noqa: E402
from test_fast import run_fast_on, run_reference  # noqa: E402

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import probe_gemv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


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


def test_only_one_row_linears_are_routed_to_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(gemv, "linear", lambda *args: calls.append(args[0].shape) or F.linear(*args))
    w, b = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    with gemv.OneRowLinears():
        one = F.linear(torch.randn(1, 1, 16, dtype=torch.float64), w, b)
        F.linear(torch.randn(1, 3, 16, dtype=torch.float64), w, b)      # a prefill: three rows
        F.linear(torch.randn(1, 16, dtype=torch.float64), w.T.contiguous().T, bias=b)   # column-major weight
        torch.nn.Linear(16, 8, dtype=torch.float64)(torch.randn(16, dtype=torch.float64))  # nn.Linear calls F.linear
    assert calls == [(1, 1, 16), (16,)] and one.shape == (1, 1, 8)


@pytest.mark.parametrize("case", ["strict", "lazy_drop"])
@pytest.mark.parametrize("model_name", ["gpt_neox", "llama"])
def test_fast_engine_with_the_gemv_matches_reference(model_name, case, monkeypatch):
    """The whole engine, eager, with every decode step's linears on this kernel (Pythia's biases, Llama's
    none): equal to the float64 reference. Tiles as wide as the tiny models' matrices: the interpreter runs
    a launch's programs one by one, and every tile size is checked above."""
    monkeypatch.setattr(gemv, "DEFAULT_TILE", (64, 64, 4))
    got = run_fast_on(DEVICE, model_name, case, graph=False, compile=False, linear="triton")
    assert max_diff(got.nll, run_reference(model_name, case, "cache").nll) <= EXACT


@pytest.mark.parametrize("model_name", ["gpt_neox", "llama"])
def test_the_compiled_step_with_the_gemv_matches_reference(model_name, monkeypatch):
    """The step as the engine compiles it (torch.compile; on a GPU also the CUDA graph), every decode step's
    linears on this kernel: equal to the float64 reference."""
    monkeypatch.setattr(gemv, "DEFAULT_TILE", (64, 64, 4))
    got = run_fast_on(DEVICE, model_name, "strict", graph=DEVICE == "cuda", compile=True, linear="triton")
    assert max_diff(got.nll, run_reference(model_name, "strict", "cache").nll) <= EXACT


def test_compile_sees_one_opaque_operator_per_linear():
    """torch.compile must not trace into the kernel's launch (slow on a GPU, an error under the interpreter):
    each one-row linear reaches the graph as gemv.one_row_linear, and nothing of Triton does."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    w, b = torch.randn(8, 16, dtype=torch.float64, device=DEVICE), torch.randn(8, dtype=torch.float64, device=DEVICE)

    def two_linears(x):
        with gemv.OneRowLinears():
            return F.linear(F.linear(x, w, b), w.T.contiguous(), None)

    x = torch.randn(1, 16, dtype=torch.float64, device=DEVICE)
    got = torch.compile(two_linears, backend=backend, fullgraph=True)(x)
    assert max_diff(got, F.linear(F.linear(x, w, b), w.T.contiguous())) <= 1e-12
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert targets.count("streamkv.one_row_linear.default") == 2, targets
    assert not [t for t in targets if "triton" in t.lower()], targets


# Ahead-of-time compile for sm_90, in a process without TRITON_INTERPRET (under it, kernels are not compiled):
# fp16 tensors (fp32 work) and float64 ones (float64 work); with and without a bias; every tile the engine or
# the probe launches.
COMPILE_FOR_HOPPER = textwrap.dedent("""
    import itertools, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from streamkv.engines import gemv
    sys.path.insert(0, sys.argv[1])
    import probe_gemv
    tiles = set(gemv.TILES.values()) | {gemv.DEFAULT_TILE} | set(itertools.product(*probe_gemv.GRID.values()))
    for (block_n, block_k, num_warps), io, bias in itertools.product(sorted(tiles), ("fp16", "fp64"), (True, False)):
        constexprs = {"BLOCK_N": block_n, "BLOCK_K": block_k, "HAS_BIAS": bias}
        signature = {name: "constexpr" if name in constexprs else
                     ("*" + io if name.endswith("_ptr") else "i32") for name in gemv._gemv.arg_names}
        compiled = triton.compile(ASTSource(fn=gemv._gemv, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert compiled.asm["cubin"], (block_n, block_k, num_warps, io, bias)
        print(block_n, block_k, num_warps, io, bias, "ok")
""")


def test_kernel_compiles_for_hopper_on_every_tile():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER, str(SCRIPTS)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    tiles = set(gemv.TILES.values()) | {gemv.DEFAULT_TILE} | set(itertools.product(*probe_gemv.GRID.values()))
    assert done.stdout.count(" ok") == 4 * len(tiles)
