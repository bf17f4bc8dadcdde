"""How a decode step's one-row linears reach the Triton GEMV (engines/gemv_fusion.py): only one-row linears;
the layer norm before, the activation after and the residual sums after folded into the kernel exactly
where the model calls them in that order, and nowhere else; in both tiny models' forwards, eager and
compiled; and the whole fast engine with each linear option against the float64 reference. Under Triton's
interpreter on a CPU (`make test-flash-decode`), or on a GPU."""
from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from streamkv.engines import gemv, gemv_fusion
from streamkv.engines.gemv_fusion import OneRowLinears
from triton_kernels import DEVICE, skip_module_without_triton

skip_module_without_triton()

from bounds import EXACT  # noqa: E402
from test_engines import max_diff  # noqa: E402
from test_fast import run_fast_on, run_reference  # noqa: E402
from tiny_models import cached_model  # noqa: E402


class Call(NamedTuple):
    """What one gemv.linear call folded in."""

    activation: int = gemv.NO_ACTIVATION
    norm: bool = False
    residuals: int = 0


GELU, SILU = gemv.ACTIVATIONS[F.gelu], gemv.ACTIVATIONS[F.silu]


def routed(monkeypatch) -> list[Call]:
    """Every gemv.linear call from now on (the kernel runs as it would)."""
    calls, whole = [], gemv.linear

    def linear(*args, activation=gemv.NO_ACTIVATION, norm=None, residuals=()):
        calls.append(Call(activation, norm is not None, len(residuals)))
        return whole(*args, activation=activation, norm=norm, residuals=residuals)

    monkeypatch.setattr(gemv, "linear", linear)
    return calls


def test_only_one_row_linears_are_routed_to_the_kernel(monkeypatch):
    calls = routed(monkeypatch)
    on = {"dtype": torch.float64, "device": DEVICE}
    w, b = torch.randn(8, 16, **on), torch.randn(8, **on)
    with OneRowLinears():
        one = F.linear(torch.randn(1, 1, 16, **on), w, b)
        F.linear(torch.randn(1, 3, 16, **on), w, b)                              # a prefill: three rows
        F.linear(torch.randn(1, 16, **on), w.T.contiguous().T, bias=b)           # column-major weight
        torch.nn.Linear(16, 8, **on)(torch.randn(16, **on))                      # nn.Linear calls F.linear
    assert calls == [Call(), Call()] and one.shape == (1, 1, 8)


def test_an_activation_right_after_a_one_row_linear_runs_in_the_kernel(monkeypatch):
    """F.gelu / F.silu on the output of the call just before: fused (one more kernel call, with the
    activation; eager, the plain product stays computed and unused). Anything in between, an in-place op on
    that output, tanh's GELU, an in-place SiLU or a prefill's rows: not fused, and every result exact."""
    calls = routed(monkeypatch)
    w, b = torch.randn(8, 16, dtype=torch.float64, device=DEVICE), torch.randn(8, dtype=torch.float64, device=DEVICE)
    x = torch.randn(1, 1, 16, dtype=torch.float64, device=DEVICE)
    want = x @ w.T + b
    with OneRowLinears(fuse_activations=True):
        fused = {name: function(F.linear(x, w, b)) for name, function in (("gelu", F.gelu), ("silu", F.silu))}
        assert calls == [Call(), Call(GELU), Call(), Call(SILU)]
        calls.clear()
        y = F.linear(x, w, b)
        shifted = F.gelu(y.add_(1.0))                                   # in place, then GELU: not fused
        tanh = F.gelu(F.linear(x, w, b), approximate="tanh")
        in_place = F.silu(F.linear(x, w, b), inplace=True)
        rows = F.gelu(F.linear(x.expand(1, 3, 16), w, b))                # a prefill's three rows: F.linear
        assert calls == [Call()] * 3
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
        with torch.inference_mode(), OneRowLinears(fuse_activations=fuse):
            model(input_ids=torch.tensor([[3]], device=DEVICE))
        assert sum(1 for call in calls if call.activation != gemv.NO_ACTIVATION) == (
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
    with OneRowLinears(fuse_activations=True, fuse_norms=True):
        plain = F.linear(norm(x), w, b)
        y = norm(x)
        assert y.shape == (1, 1, 16)                 # an attribute read in between: still fused
        read = F.linear(y, w, b)
        both = F.gelu(F.linear(norm(x), w, b))
        assert calls == [Call(norm=True)] * 3 + [Call(GELU, norm=True)]
        calls.clear()
        y = norm(x)
        y.mul(1.0)                                   # another call in between
        other = F.linear(y, w, b)
        shifted = F.linear(norm(x).add_(1.0), w, b)   # in place in between
        no_affine = F.linear(F.layer_norm(x, (16,)), w, b)
        rows = F.linear(norm(x.expand(1, 3, 16)), w, b)   # a prefill: F.linear itself
        assert calls == [Call()] * 3
    with OneRowLinears(fuse_activations=True):
        unasked = F.linear(norm(x), w, b)
    assert calls[3:] == [Call()]
    for got in (plain, read, other, unasked):
        assert max_diff(got, want) <= 1e-12
    assert max_diff(both, F.gelu(want)) <= 1e-12 and max_diff(rows, want.expand(1, 3, 8)) <= 1e-12
    assert max_diff(shifted, F.linear(norm(x) + 1, w, b)) <= 1e-12
    assert max_diff(no_affine, F.linear(F.layer_norm(x, (16,)), w, b)) <= 1e-12


def test_only_a_one_row_norm_over_the_last_dim_with_weight_and_bias_is_fusable():
    x, weight, bias = torch.randn(1, 1, 16), torch.randn(16), torch.randn(16)
    assert gemv_fusion.norm_of((x, (16,), weight, bias), {"eps": 1e-6}) == gemv.Norm(weight, bias, 1e-6)
    assert gemv_fusion.norm_of((x, [16]), {"weight": weight, "bias": bias}).eps == 1e-5
    refused = [((x.view(1, 1, 2, 8), (2, 8), weight.view(2, 8), bias.view(2, 8)), {}),   # over two dims
               ((x, (16,)), {}), ((x, (16,), weight, None), {}),                            # no affine
               ((x.expand(3, 1, 16), (16,), weight, bias), {}),                             # three rows
               ((x, (16,), torch.randn(16, 2)[:, 0], bias), {})]                            # strided weight
    assert [gemv_fusion.norm_of(*call) for call in refused] == [None] * len(refused)


def test_residual_sums_right_after_a_one_row_linear_run_in_the_kernel(monkeypatch):
    """Up to two sums with a tensor of the output's shape and dtype, either operand order, after an
    activation and across an eval-mode dropout: fused. A third sum, a sum before the activation, alpha, an
    in-place sum, a broadcast operand, a training dropout in between, or a mode without fuse_residuals: not
    fused; every result exact."""
    calls = routed(monkeypatch)
    on = {"dtype": torch.float64, "device": DEVICE}
    w, b = torch.randn(8, 16, **on), torch.randn(8, **on)
    x, r1, r2, r3 = torch.randn(1, 1, 16, **on), torch.randn(1, 1, 8, **on), torch.randn(1, 1, 8, **on), \
        torch.randn(1, 1, 8, **on)
    want, flat = F.linear(x, w, b), r1.view(8)
    with OneRowLinears(fuse_activations=True, fuse_residuals=True):
        left, right, add = F.linear(x, w, b) + r1, r1 + F.linear(x, w, b), torch.add(F.linear(x, w, b), r1)
        chain = F.dropout(F.linear(x, w, b), 0.1, training=False) + r1 + r2
        activated = F.gelu(F.linear(x, w, b)) + r1
        assert calls == [Call(), Call(residuals=1)] * 3 + [Call(), Call(residuals=1), Call(residuals=2),
                                                          Call(), Call(GELU), Call(GELU, residuals=1)]
        calls.clear()
        third = F.linear(x, w, b) + r1 + r2 + r3
        calls.clear()
        late_gelu = F.gelu(F.linear(x, w, b) + r1)
        scaled = torch.add(F.linear(x, w, b), r1, alpha=2.0)
        y = F.linear(x, w, b)
        y += r1
        broadcast = F.linear(x, w, b) + flat
        training = F.dropout(F.linear(x, w, b), 0.0, training=True) + r1
        assert calls == [Call(), Call(residuals=1)] + [Call()] * 4
    with OneRowLinears(fuse_activations=True):
        unasked = F.linear(x, w, b) + r1
    assert calls[6:] == [Call()]
    for got in (left, right, add, unasked, training):
        assert max_diff(got, want + r1) <= 1e-12
    assert max_diff(chain, want + r1 + r2) <= 1e-12 and max_diff(third, want + r1 + r2 + r3) <= 1e-12
    assert max_diff(activated, F.gelu(want) + r1) <= 1e-12 and max_diff(late_gelu, F.gelu(want + r1)) <= 1e-12
    assert max_diff(scaled, want + 2 * r1) <= 1e-12 and max_diff(y, want + r1) <= 1e-12
    assert max_diff(broadcast, want + r1) <= 1e-12


# What a one-token forward of each tiny model folds into the kernel with every fusion on, eager (every
# shorter chain is computed too) and compiled (Inductor keeps only the longest), per layer, then the LM head
# (its norm is not fused: its input is sliced in between).
FOLDED = {
    "gpt_neox": {  # query_key_value, dense, dense_h_to_4h and its GELU, dense_4h_to_h + attn_output + hidden
        "eager": [Call(norm=True), Call(), Call(norm=True), Call(GELU, True), Call(), Call(residuals=1),
                  Call(residuals=2)],
        "compiled": [Call(norm=True), Call(), Call(GELU, True), Call(residuals=2)]},
    "llama": {  # q, k, v, o_proj + residual; gate_proj and its SiLU, up_proj, down_proj + residual
        "eager": [Call()] * 4 + [Call(residuals=1), Call(), Call(SILU), Call(), Call(), Call(residuals=1)],
        "compiled": [Call()] * 3 + [Call(residuals=1), Call(SILU), Call(), Call(residuals=1)]}}


@pytest.mark.parametrize("model_name", sorted(FOLDED))
def test_a_decode_step_folds_every_neighbour_the_kernel_takes(model_name, monkeypatch):
    model = cached_model(model_name).to(DEVICE)
    calls = routed(monkeypatch)
    with torch.inference_mode(), OneRowLinears(fuse_activations=True, fuse_norms=True, fuse_residuals=True):
        model(input_ids=torch.tensor([[3]], device=DEVICE))
    assert calls == FOLDED[model_name]["eager"] * model.config.num_hidden_layers + [Call()]


def test_compiled_the_unfused_product_is_dropped(monkeypatch):
    """Inductor drops the plain product the mode returned before it saw the activation (no use left), so
    the compiled call runs the kernel once per linear: fused, then plain."""
    calls = routed(monkeypatch)
    w1, w2 = (torch.randn(*shape, dtype=torch.float64, device=DEVICE) for shape in ((8, 16), (16, 8)))

    def mlp(x):
        with OneRowLinears(fuse_activations=True):
            return F.linear(F.gelu(F.linear(x, w1)), w2)

    x = torch.randn(1, 16, dtype=torch.float64, device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(mlp, fullgraph=True)
    compiled(x)
    calls.clear()
    got = compiled(x)
    assert calls == [Call(GELU), Call()]
    assert max_diff(got, F.gelu(x @ w1.T) @ w2.T) <= 1e-12


def test_compiled_a_layer_norm_and_residual_sums_run_in_the_kernel(monkeypatch):
    """Traced by torch.compile, the norm, its shape read, the linear, an eval dropout and two sums are still
    seen in order: the compiled call runs the kernel once, with all of them."""
    calls = routed(monkeypatch)
    on = {"dtype": torch.float64, "device": DEVICE}
    w, weight, bias = torch.randn(8, 16, **on), torch.randn(16, **on), torch.randn(16, **on)

    def block(x, attn, hidden):
        with OneRowLinears(fuse_norms=True, fuse_residuals=True):
            y = F.layer_norm(x, (16,), weight, bias)
            assert y.shape[-1] == 16
            return F.dropout(F.linear(y, w), 0.1, training=False) + attn + hidden

    x, attn, hidden = torch.randn(1, 1, 16, **on), torch.randn(1, 1, 8, **on), torch.randn(1, 1, 8, **on)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    compiled(x, attn, hidden)
    calls.clear()
    got = compiled(x, attn, hidden)
    assert calls == [Call(norm=True, residuals=2)]
    assert max_diff(got, F.linear(F.layer_norm(x, (16,), weight, bias), w) + attn + hidden) <= 1e-12


@pytest.mark.parametrize("case", ["strict", "lazy_drop"])
@pytest.mark.parametrize("model_name", ["gpt_neox", "llama"])
def test_fast_engine_with_the_gemv_matches_reference(model_name, case, monkeypatch):
    """The whole engine, eager, with every decode step's linears on this kernel (Pythia's biases, Llama's
    none): equal to the float64 reference. Tiles as wide as the tiny models' matrices: the interpreter runs
    a launch's programs one by one, and every tile size is checked in test_gemv.py. (`triton_activation`'s
    fold is part of `triton_fused`'s; the compiled step below runs it too.)"""
    monkeypatch.setattr(gemv, "DEFAULT_TILE", (64, 64, 4))
    for linear in ("triton", "triton_fused"):
        got = run_fast_on(DEVICE, model_name, case, graph=False, compile=False, linear=linear)
        assert max_diff(got.nll, run_reference(model_name, case, "cache").nll) <= EXACT, linear


@pytest.mark.parametrize("model_name", sorted(FOLDED))
def test_the_compiled_step_with_the_gemv_matches_reference(model_name, monkeypatch):
    """The step as the engine compiles it (torch.compile; on a GPU also the CUDA graph), every decode step's
    linears on this kernel: equal to the float64 reference. With `triton_fused`, every step folds what
    FOLDED says, and only the longest chain runs."""
    monkeypatch.setattr(gemv, "DEFAULT_TILE", (64, 64, 4))
    calls = routed(monkeypatch)
    for linear in ("triton", "triton_activation", "triton_fused"):
        calls.clear()
        got = run_fast_on(DEVICE, model_name, "strict", graph=DEVICE == "cuda", compile=True, linear=linear)
        assert max_diff(got.nll, run_reference(model_name, "strict", "cache").nll) <= EXACT, linear
    step = FOLDED[model_name]["compiled"] * cached_model(model_name).config.num_hidden_layers + [Call()]
    steps = len(calls) // len(step)
    # Inductor may order independent kernels otherwise than the model calls them: counted, not listed.
    assert steps > 0 and Counter(calls) == {call: n * steps for call, n in Counter(step).items()}


def test_compile_sees_one_opaque_operator_per_linear():
    """torch.compile must not trace into the kernel's launch (slow on a GPU, an error under the interpreter):
    each one-row linear reaches the graph as gemv.one_row_linear, and nothing of Triton does."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    w, b = torch.randn(8, 16, dtype=torch.float64, device=DEVICE), torch.randn(8, dtype=torch.float64, device=DEVICE)

    def two_linears(x):
        with OneRowLinears():
            return F.linear(F.linear(x, w, b), w.T.contiguous(), None)

    x = torch.randn(1, 16, dtype=torch.float64, device=DEVICE)
    got = torch.compile(two_linears, backend=backend, fullgraph=True)(x)
    assert max_diff(got, F.linear(F.linear(x, w, b), w.T.contiguous())) <= 1e-12
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert targets.count("streamkv.one_row_linear.default") == 2, targets
    assert not [t for t in targets if "triton" in t.lower()], targets
