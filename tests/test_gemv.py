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
    monkeypatch.setattr(gemv, "linear", lambda *args, activation: calls.append(args[0].shape) or F.linear(*args))
    w, b = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    with gemv.OneRowLinears():
        one = F.linear(torch.randn(1, 1, 16, dtype=torch.float64), w, b)
        F.linear(torch.randn(1, 3, 16, dtype=torch.float64), w, b)      # a prefill: three rows
        F.linear(torch.randn(1, 16, dtype=torch.float64), w.T.contiguous().T, bias=b)   # column-major weight
        torch.nn.Linear(16, 8, dtype=torch.float64)(torch.randn(16, dtype=torch.float64))  # nn.Linear calls F.linear
    assert calls == [(1, 1, 16), (16,)] and one.shape == (1, 1, 8)


@pytest.mark.parametrize("activation, function", [(1, F.gelu), (2, F.silu)])
@pytest.mark.parametrize("n_out, n_in", [(37, 300), (2560, 2560)])
def test_linear_with_an_activation_is_the_float64_activation_of_the_product(n_out, n_in, activation, function):
    assert gemv.ACTIVATIONS[function] == activation
    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((1, n_in), (n_out, n_in), (n_out,)))
    got = gemv.linear(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), activation=activation).cpu()
    assert max_diff(got, function(x @ w.T + b)) <= 1e-9


def routed(monkeypatch) -> list:
    """The `activation` of every gemv.linear call from now on (the kernel runs as it would)."""
    calls, whole = [], gemv.linear
    monkeypatch.setattr(gemv, "linear", lambda *args, activation=gemv.NO_ACTIVATION: calls.append(activation)
                        or whole(*args, activation=activation))
    return calls


def test_an_activation_right_after_a_one_row_linear_runs_in_the_kernel(monkeypatch):
    """F.gelu / F.silu on the output of the call just before: fused (one more kernel call, with the
    activation; eager, the plain product stays computed and unused). Anything in between, an in-place op on
    that output, tanh's GELU, an in-place SiLU or a prefill's rows: not fused, and every result exact."""
    calls = routed(monkeypatch)
    w, b = torch.randn(8, 16, dtype=torch.float64, device=DEVICE), torch.randn(8, dtype=torch.float64, device=DEVICE)
    x = torch.randn(1, 1, 16, dtype=torch.float64, device=DEVICE)
    want = x @ w.T + b
    with gemv.OneRowLinears(fuse_activations=True):
        fused = {name: function(F.linear(x, w, b)) for name, function in (("gelu", F.gelu), ("silu", F.silu))}
        assert calls == [0, 1, 0, 2]
        calls.clear()
        y = F.linear(x, w, b)
        shifted = F.gelu(y.add_(1.0))                                   # in place, then GELU: not fused
        tanh = F.gelu(F.linear(x, w, b), approximate="tanh")
        in_place = F.silu(F.linear(x, w, b), inplace=True)
        rows = F.gelu(F.linear(x.expand(1, 3, 16), w, b))                # a prefill's three rows: F.linear
        assert calls == [0, 0, 0]
    assert max_diff(fused["gelu"], F.gelu(want)) <= 1e-12 and max_diff(fused["silu"], F.silu(want)) <= 1e-12
    assert max_diff(shifted, F.gelu(want + 1)) <= 1e-12
    assert max_diff(tanh, F.gelu(want, approximate="tanh")) <= 1e-12 and max_diff(in_place, F.silu(want)) <= 1e-12
    assert max_diff(rows, F.gelu(want.expand(1, 3, 8))) <= 1e-12


@pytest.mark.parametrize("model_name", ["gpt_neox", "llama"])
def test_every_mlp_activation_of_a_decode_step_runs_in_the_kernel(model_name, monkeypatch):
    """A one-token forward of each tiny model (GPT-NeoX's GELU, Llama's SiLU) fuses every layer's, only when
    asked to."""
    from tiny_models import cached_model
    model = cached_model(model_name).to(DEVICE)
    calls = routed(monkeypatch)
    for fuse in (False, True):
        calls.clear()
        with torch.inference_mode(), gemv.OneRowLinears(fuse_activations=fuse):
            model(input_ids=torch.tensor([[3]], device=DEVICE))
        assert sum(1 for a in calls if a != gemv.NO_ACTIVATION) == (model.config.num_hidden_layers if fuse else 0)


def test_compiled_the_unfused_product_is_dropped(monkeypatch):
    """Inductor drops the plain product the mode returned before it saw the activation (no use left), so
    the compiled call runs the kernel once per linear: fused, then plain."""
    calls = routed(monkeypatch)
    w1, w2 = (torch.randn(*shape, dtype=torch.float64, device=DEVICE) for shape in ((8, 16), (16, 8)))

    def mlp(x):
        with gemv.OneRowLinears(fuse_activations=True):
            return F.linear(F.gelu(F.linear(x, w1)), w2)

    x = torch.randn(1, 16, dtype=torch.float64, device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(mlp, fullgraph=True)
    compiled(x)
    calls.clear()
    got = compiled(x)
    assert calls == [1, 0]
    assert max_diff(got, F.gelu(x @ w1.T) @ w2.T) <= 1e-12


@pytest.mark.parametrize("case", ["strict", "lazy_drop"])
@pytest.mark.parametrize("model_name", ["gpt_neox", "llama"])
def test_fast_engine_with_the_gemv_matches_reference(model_name, case, monkeypatch):
    """The whole engine, eager, with every decode step's linears on this kernel (Pythia's biases, Llama's
    none): equal to the float64 reference. Tiles as wide as the tiny models' matrices: the interpreter runs
    a launch's programs one by one, and every tile size is checked above."""
    monkeypatch.setattr(gemv, "DEFAULT_TILE", (64, 64, 4))
    for linear in ("triton", "triton_fused"):
        got = run_fast_on(DEVICE, model_name, case, graph=False, compile=False, linear=linear)
        assert max_diff(got.nll, run_reference(model_name, case, "cache").nll) <= EXACT, linear


@pytest.mark.parametrize("model_name", ["gpt_neox", "llama"])
def test_the_compiled_step_with_the_gemv_matches_reference(model_name, monkeypatch):
    """The step as the engine compiles it (torch.compile; on a GPU also the CUDA graph), every decode step's
    linears on this kernel: equal to the float64 reference."""
    monkeypatch.setattr(gemv, "DEFAULT_TILE", (64, 64, 4))
    for linear in ("triton", "triton_fused"):
        got = run_fast_on(DEVICE, model_name, "strict", graph=DEVICE == "cuda", compile=True, linear=linear)
        assert max_diff(got.nll, run_reference(model_name, "strict", "cache").nll) <= EXACT, linear


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
    engine = set(gemv.TILES.values()) | {gemv.DEFAULT_TILE}
    tiles = engine | set(itertools.product(*probe_gemv.GRID.values()))
    for (block_n, block_k, num_warps), io, bias in itertools.product(sorted(tiles), ("fp16", "fp64"), (True, False)):
        # The probe times plain products; the engine's tiles also run with every activation.
        for activation in [0, *gemv.ACTIVATIONS.values()] if (block_n, block_k, num_warps) in engine else [0]:
            constexprs = {"BLOCK_N": block_n, "BLOCK_K": block_k, "HAS_BIAS": bias, "ACTIVATION": activation}
            signature = {name: "constexpr" if name in constexprs else
                         ("*" + io if name.endswith("_ptr") else "i32") for name in gemv._gemv.arg_names}
            compiled = triton.compile(ASTSource(fn=gemv._gemv, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
            assert compiled.asm["cubin"], (block_n, block_k, num_warps, io, bias, activation)
            print(block_n, block_k, num_warps, io, bias, activation, "ok")
""")


def test_kernel_compiles_for_hopper_on_every_tile():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER, str(SCRIPTS)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    engine = set(gemv.TILES.values()) | {gemv.DEFAULT_TILE}
    tiles = engine | set(itertools.product(*probe_gemv.GRID.values()))
    assert done.stdout.count(" ok") == 4 * (len(tiles) + len(gemv.ACTIVATIONS) * len(engine))
