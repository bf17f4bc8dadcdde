"""The fast engine's Triton GEMV (engines/gemv.py): the float64 product on every tile the probe times, with
and without a bias; routed to only for one-row linears; the whole engine with it against the float64
reference; and compiled for an H100 ahead of time. Under Triton's interpreter on a CPU (`make
test-flash-decode`), or on a GPU."""
from __future__ import annotations

import itertools
import os
from collections import Counter
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
from tiny_models import cached_model  # noqa: E402

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
    monkeypatch.setattr(gemv, "linear", lambda *args, activation, norm: calls.append(args[0].shape) or F.linear(*args))
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


@pytest.mark.parametrize("activation", [gemv.NO_ACTIVATION, *gemv.ACTIVATIONS.values()])
@pytest.mark.parametrize("n_out, n_in", [(37, 300), (2560, 2560)])
def test_linear_with_a_norm_is_the_float64_norm_then_product(n_out, n_in, activation):
    """The layer norm applied in the kernel: mean and variance of a row far from zero-mean (a kernel that
    skipped the centring, or eps, misses by far more than the bound), then the product and the activation."""
    g = torch.Generator().manual_seed(4)
    x = 5 * torch.randn(1, 1, n_in, generator=g, dtype=torch.float64) + 3
    w, b, weight, bias = (torch.randn(*shape, generator=g, dtype=torch.float64)
                          for shape in ((n_out, n_in), (n_out,), (n_in,), (n_in,)))
    norm = gemv.Norm(weight.to(DEVICE), bias.to(DEVICE), 1e-5)
    got = gemv.linear(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), activation=activation, norm=norm).cpu()
    want = F.linear(F.layer_norm(x, (n_in,), weight, bias, 1e-5), w, b)
    function = {v: f for f, v in gemv.ACTIVATIONS.items()}.get(activation, lambda y: y)
    assert max_diff(got, function(want)) <= 1e-9


def routed(monkeypatch) -> list:
    """(activation, with a norm) of every gemv.linear call from now on (the kernel runs as it would)."""
    calls, whole = [], gemv.linear
    monkeypatch.setattr(gemv, "linear", lambda *args, activation=gemv.NO_ACTIVATION, norm=None: calls.append(
                        (activation, norm is not None)) or whole(*args, activation=activation, norm=norm))
    return calls


def activations(calls) -> list:
    return [activation for activation, _ in calls]


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
        assert activations(calls) == [0, 1, 0, 2]
        calls.clear()
        y = F.linear(x, w, b)
        shifted = F.gelu(y.add_(1.0))                                   # in place, then GELU: not fused
        tanh = F.gelu(F.linear(x, w, b), approximate="tanh")
        in_place = F.silu(F.linear(x, w, b), inplace=True)
        rows = F.gelu(F.linear(x.expand(1, 3, 16), w, b))                # a prefill's three rows: F.linear
        assert activations(calls) == [0, 0, 0]
    assert max_diff(fused["gelu"], F.gelu(want)) <= 1e-12 and max_diff(fused["silu"], F.silu(want)) <= 1e-12
    assert max_diff(shifted, F.gelu(want + 1)) <= 1e-12
    assert max_diff(tanh, F.gelu(want, approximate="tanh")) <= 1e-12 and max_diff(in_place, F.silu(want)) <= 1e-12
    assert max_diff(rows, F.gelu(want.expand(1, 3, 8))) <= 1e-12


@pytest.mark.parametrize("model_name", ["gpt_neox", "llama"])
def test_every_mlp_activation_of_a_decode_step_runs_in_the_kernel(model_name, monkeypatch):
    """A one-token forward of each tiny model (GPT-NeoX's GELU, Llama's SiLU) fuses every layer's, only when
    asked to."""
    model = cached_model(model_name).to(DEVICE)
    calls = routed(monkeypatch)
    for fuse in (False, True):
        calls.clear()
        with torch.inference_mode(), gemv.OneRowLinears(fuse_activations=fuse):
            model(input_ids=torch.tensor([[3]], device=DEVICE))
        assert sum(1 for a in activations(calls) if a != gemv.NO_ACTIVATION) == (
            model.config.num_hidden_layers if fuse else 0)


def test_a_layer_norm_right_before_a_one_row_linear_runs_in_the_kernel(monkeypatch):
    """F.linear on the output of the F.layer_norm just before, reading its shape in between or not: the
    kernel gets the norm's input and the norm, then the activation after it too. Any other call in between
    (an in-place one on the norm's output included), a norm without weight and bias, a prefill's rows, or a
    mode without fuse_norms: not fused; every result exact."""
    calls = routed(monkeypatch)
    on = {"dtype": torch.float64, "device": DEVICE}
    w, b = torch.randn(8, 16, **on), torch.randn(8, **on)
    weight, bias = torch.randn(16, **on), torch.randn(16, **on)
    x = 3 * torch.randn(1, 1, 16, **on) + 1

    def norm(t):
        return F.layer_norm(t, (16,), weight, bias, 1e-5)

    want = F.linear(norm(x), w, b)
    with gemv.OneRowLinears(fuse_activations=True, fuse_norms=True):
        plain = F.linear(norm(x), w, b)
        y = norm(x)
        assert y.shape == (1, 1, 16)                 # an attribute read in between: still fused
        read = F.linear(y, w, b)
        both = F.gelu(F.linear(norm(x), w, b))
        assert calls == [(0, True), (0, True), (0, True), (1, True)]
        calls.clear()
        y = norm(x)
        y.mul(1.0)                                   # another call in between
        other = F.linear(y, w, b)
        shifted = F.linear(norm(x).add_(1.0), w, b)   # in place in between
        no_affine = F.linear(F.layer_norm(x, (16,)), w, b)
        rows = F.linear(norm(x.expand(1, 3, 16)), w, b)   # a prefill: F.linear itself
        assert calls == [(0, False)] * 3
    with gemv.OneRowLinears(fuse_activations=True):
        unasked = F.linear(norm(x), w, b)
    assert calls[3:] == [(0, False)]
    for got in (plain, read, other, unasked):
        assert max_diff(got, want) <= 1e-12
    assert max_diff(both, F.gelu(want)) <= 1e-12 and max_diff(rows, want.expand(1, 3, 8)) <= 1e-12
    assert max_diff(shifted, F.linear(norm(x) + 1, w, b)) <= 1e-12
    assert max_diff(no_affine, F.linear(F.layer_norm(x, (16,)), w, b)) <= 1e-12


def test_only_a_one_row_norm_over_the_last_dim_with_weight_and_bias_is_fusable():
    x, weight, bias = torch.randn(1, 1, 16), torch.randn(16), torch.randn(16)
    assert gemv.norm_of((x, (16,), weight, bias), {"eps": 1e-6}) == gemv.Norm(weight, bias, 1e-6)
    assert gemv.norm_of((x, [16]), {"weight": weight, "bias": bias}).eps == 1e-5
    refused = [((x.view(1, 1, 2, 8), (2, 8), weight.view(2, 8), bias.view(2, 8)), {}),   # over two dims
               ((x, (16,)), {}), ((x, (16,), weight, None), {}),                            # no affine
               ((x.expand(3, 1, 16), (16,), weight, bias), {}),                             # three rows
               ((x, (16,), torch.randn(16, 2)[:, 0], bias), {})]                            # strided weight
    assert [gemv.norm_of(*call) for call in refused] == [None] * len(refused)


@pytest.mark.parametrize("model_name", ["gpt_neox", "llama"])
def test_both_layer_norms_of_each_gpt_neox_layer_run_in_the_kernel(model_name, monkeypatch):
    """A one-token forward with fuse_norms: GPT-NeoX's norms before query_key_value and dense_h_to_4h
    (then its GELU, with the norm); not the final one (the LM head's input is sliced in between), and none
    of Llama's RMSNorms, which are not F.layer_norm."""
    model = cached_model(model_name).to(DEVICE)
    calls = routed(monkeypatch)
    with torch.inference_mode(), gemv.OneRowLinears(fuse_activations=True, fuse_norms=True):
        model(input_ids=torch.tensor([[3]], device=DEVICE))
    layers = model.config.num_hidden_layers
    if model_name == "llama":
        assert calls and not any(normed for _, normed in calls)
        return
    # Per layer: query_key_value, the attention's dense, dense_h_to_4h plain (eager: computed, unused) and
    # with its GELU, dense_4h_to_h; then the LM head.
    gelu = gemv.ACTIVATIONS[F.gelu]
    assert calls == [(0, True), (0, False), (0, True), (gelu, True), (0, False)] * layers + [(0, False)]


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
    assert calls == [(1, False), (0, False)]
    assert max_diff(got, F.gelu(x @ w1.T) @ w2.T) <= 1e-12


def test_compiled_a_layer_norm_runs_in_the_kernel(monkeypatch):
    """Traced by torch.compile, the norm, its shape read and the linear are still seen in order: the
    compiled call runs the kernel once, with the norm."""
    calls = routed(monkeypatch)
    on = {"dtype": torch.float64, "device": DEVICE}
    w, weight, bias = torch.randn(8, 16, **on), torch.randn(16, **on), torch.randn(16, **on)

    def attention_input(x):
        with gemv.OneRowLinears(fuse_norms=True):
            y = F.layer_norm(x, (16,), weight, bias)
            return F.linear(y, w).view(*y.shape[:-1], 2, 4)

    x = torch.randn(1, 1, 16, **on)
    torch._dynamo.reset()
    compiled = torch.compile(attention_input, fullgraph=True)
    compiled(x)
    calls.clear()
    got = compiled(x)
    assert calls == [(0, True)]
    assert max_diff(got, F.linear(F.layer_norm(x, (16,), weight, bias), w).view(1, 1, 2, 4)) <= 1e-12


@pytest.mark.parametrize("case", ["strict", "lazy_drop"])
@pytest.mark.parametrize("model_name", ["gpt_neox", "llama"])
def test_fast_engine_with_the_gemv_matches_reference(model_name, case, monkeypatch):
    """The whole engine, eager, with every decode step's linears on this kernel (Pythia's biases, Llama's
    none): equal to the float64 reference. Tiles as wide as the tiny models' matrices: the interpreter runs
    a launch's programs one by one, and every tile size is checked above."""
    monkeypatch.setattr(gemv, "DEFAULT_TILE", (64, 64, 4))
    for linear in ("triton", "triton_activation", "triton_fused"):
        got = run_fast_on(DEVICE, model_name, case, graph=False, compile=False, linear=linear)
        assert max_diff(got.nll, run_reference(model_name, case, "cache").nll) <= EXACT, linear


@pytest.mark.parametrize("model_name", ["gpt_neox", "llama"])
def test_the_compiled_step_with_the_gemv_matches_reference(model_name, monkeypatch):
    """The step as the engine compiles it (torch.compile; on a GPU also the CUDA graph), every decode step's
    linears on this kernel: equal to the float64 reference. With `triton_fused`, each GPT-NeoX layer's two
    norms run in the kernel and the MLP's plain product is dropped: per step and layer, query_key_value
    with its norm, dense_h_to_4h with its norm and GELU, the two other linears plain; then the LM head."""
    monkeypatch.setattr(gemv, "DEFAULT_TILE", (64, 64, 4))
    calls = routed(monkeypatch)
    for linear in ("triton", "triton_activation", "triton_fused"):
        calls.clear()
        got = run_fast_on(DEVICE, model_name, "strict", graph=DEVICE == "cuda", compile=True, linear=linear)
        assert max_diff(got.nll, run_reference(model_name, "strict", "cache").nll) <= EXACT, linear
    layers = cached_model(model_name).config.num_hidden_layers
    if model_name == "gpt_neox":
        steps = len(calls) // (4 * layers + 1)
        assert steps > 0 and Counter(calls) == {(0, True): layers * steps, (gemv.ACTIVATIONS[F.gelu], True):
                                                layers * steps, (0, False): (2 * layers + 1) * steps}
    else:
        assert calls and not any(normed for _, normed in calls)


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
# the probe launches; the engine's also with every activation and with a norm over Pythia-2.8B's 2560 features.
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
        # The probe times plain products; the engine's tiles also run with every activation and a norm.
        fused = (block_n, block_k, num_warps) in engine
        for activation, norm in itertools.product([0, *gemv.ACTIVATIONS.values()] if fused else [0],
                                                  (False, True) if fused else (False,)):
            constexprs = {"BLOCK_N": block_n, "BLOCK_K": block_k, "HAS_BIAS": bias, "ACTIVATION": activation,
                          "NORM": norm, "NORM_BLOCK": 4096 if norm else 1}
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
