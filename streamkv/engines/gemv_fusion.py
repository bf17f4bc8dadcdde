"""How a decode step's one-row linears reach the Triton GEMV (engines/gemv.py), and which of their
neighbours the kernel takes over, without patching the model.

`OneRowLinears` is a TorchFunctionMode the fast engine enters around each decode step's forward. It sends
every F.linear whose input holds one row to gemv.one_row_linear (one opaque operator, which torch.compile
calls without tracing the launch) and every other call (the prefill's) on unchanged. Asked to, it also folds
a neighbour of such a linear into the kernel, where the very next call is that neighbour (attribute reads
such as `.shape` compute nothing and do not count):

- `fuse_norms`: a linear whose input is the output of the F.layer_norm just before is handed the norm's
  input and its weight, bias and eps instead. GPT-NeoX feeds the residual stream through a norm into
  query_key_value and dense_h_to_4h; on the H100 step's profile a layer's residual add and its norms are
  one reduction kernel, 3.5 µs a layer (110 µs a step): one program reducing 2560 features, a latency,
  not a bandwidth, cost. In the kernel every program computes the row's mean and variance itself (a
  5 KB row, read from cache). The final norm is not fused (the LM head's input is sliced in between),
  nor is Llama's RMSNorm, which is not F.layer_norm.
- `fuse_activations`: F.gelu (exact, not tanh) or F.silu (not in place) on the linear's output (GPT-NeoX:
  gelu(dense_h_to_4h(x)); Llama: silu(gate_proj(x))), on the profile a kernel of its own a layer (GELU:
  1.2 µs on an H100).
- `fuse_residuals`: up to two sums of the output with a tensor of its shape and dtype, after the
  activation if any (GPT-NeoX's parallel residual: mlp_output + attn_output + hidden_states; Llama's
  residual + o_proj(...) and residual + down_proj(...)); an eval-mode dropout in between is the identity
  and is passed over. With the norms fused, these sums are what is left of the reduction kernel above.

A fused call returns one_row_linear with the neighbour folded in: the same function, fewer fp16
roundings. What the mode returned for the shorter chain then has no use left, and Inductor drops it from
the compiled step (eager, it is computed and unused). Any other call in between, an in-place one on the
output included, ends the chain. None of the three is timed on a GPU yet (docs/bench/README.md, issue 17),
so none is in the fast engine's default (`linear="triton"`); `"triton_activation"` asks for the
activation, `"triton_fused"` for all three.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .gemv import ACTIVATIONS, MAX_RESIDUALS, NO_ACTIVATION, NO_NORM, Norm, one_row_linear

# `a + b` and `a.add(b)` reach a TorchFunctionMode as Tensor.add; torch.add as itself.
ADDS = (torch.add, torch.Tensor.add)


def one_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """What the kernel takes: a single input row, a row-major weight with unit stride over `in`."""
    return x.numel() == x.shape[-1] and weight.dim() == 2 and weight.stride(1) == 1


def activation_of(func, args, kwargs) -> int | None:
    """The ACTIVATIONS entry of this call if the kernel can apply it to args[0] (exact GELU, SiLU not in
    place), else None."""
    activation = ACTIVATIONS.get(func)
    options = dict(zip(("approximate",) if func is F.gelu else ("inplace",), args[1:]), **kwargs)
    if activation is None or options.get("approximate", "none") != "none" or options.get("inplace", False):
        return None
    return activation


def norm_of(args, kwargs) -> Norm | None:
    """The Norm of this F.layer_norm call if the kernel can apply it to its input: one row, normalised over
    its last dim alone, with a weight and a bias (GPT-NeoX's); else None."""
    call = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args), **kwargs)
    x, weight, bias = call["input"], call.get("weight"), call.get("bias")
    n = x.shape[-1]
    if tuple(call["normalized_shape"]) != (n,) or x.numel() != n or weight is None or bias is None:
        return None
    if weight.shape != (n,) or bias.shape != (n,) or not (weight.is_contiguous() and bias.is_contiguous()):
        return None
    return Norm(weight, bias, float(call.get("eps", 1e-5)))


def residual_of(func, args, kwargs, output: torch.Tensor) -> torch.Tensor | None:
    """What this call adds to `output`, if the kernel can add it to its rows: a plain two-operand sum (no
    alpha, not in place) with a tensor of output's shape, dtype and device; else None."""
    if func not in ADDS or len(args) != 2 or kwargs:
        return None
    a, b = args
    other = b if a is output else a if b is output else None
    if not isinstance(other, torch.Tensor) or other is output:
        return None
    if other.shape != output.shape or other.dtype != output.dtype or other.device != output.device:
        return None
    return other


def is_eval_dropout(func, args, kwargs) -> bool:
    """F.dropout with training off: the identity."""
    call = dict(zip(("input", "p", "training", "inplace"), args), **kwargs)
    return func is F.dropout and not call.get("training", True)


@dataclasses.dataclass(frozen=True)
class Product:
    """A one-row linear as the kernel runs it (norm, product, activation, residuals) and its output."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    norm: Norm | None = None
    activation: int = NO_ACTIVATION
    residuals: tuple[torch.Tensor, ...] = ()
    output: torch.Tensor | None = None

    def run(self, **fold) -> Product:
        """This product with `fold` (its fields) folded in, computed."""
        p = dataclasses.replace(self, **fold)
        output = one_row_linear(p.x, p.weight, p.bias, p.activation, *(p.norm or NO_NORM), list(p.residuals))
        return dataclasses.replace(p, output=output)


class OneRowLinears(TorchFunctionMode):
    """Inside it, F.linear on one row runs the Triton GEMV, with the neighbours asked for folded in (module
    doc); everything else runs as it would."""

    def __init__(self, fuse_activations: bool = False, fuse_norms: bool = False, fuse_residuals: bool = False):
        super().__init__()
        self.fuse_activations, self.fuse_norms, self.fuse_residuals = fuse_activations, fuse_norms, fuse_residuals
        # For the very next call only: a layer norm's (output, input, Norm), the last one-row linear's Product.
        self.normed: tuple | None = None
        self.product: Product | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) == "__get__":
            # An attribute read (GPT-NeoX's attention reads its input's shape before its first linear).
            return func(*args, **kwargs)
        normed, product, self.normed, self.product = self.normed, self.product, None, None
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if one_row(x, weight):
                norm = None
                if normed is not None and x is normed[0]:
                    x, norm = normed[1], normed[2]
                self.product = Product(x, weight, bias, norm).run()
                return self.product.output
        elif func is F.layer_norm and self.fuse_norms:
            norm = norm_of(args, kwargs)
            y = func(*args, **kwargs)
            if norm is not None:
                self.normed = (y, args[0] if args else kwargs["input"], norm)
            return y
        elif product is not None:
            extended = self._extend(product, func, args, kwargs)
            if extended is not None:
                self.product = extended
                return extended.output
        return func(*args, **kwargs)

    def _extend(self, product: Product, func, args, kwargs) -> Product | None:
        """`product` with this call folded in, or None where it cannot be."""
        first = args[0] if args else None
        if self.fuse_residuals and first is product.output and is_eval_dropout(func, args, kwargs):
            return product
        if (self.fuse_activations and first is product.output and not product.residuals
                and product.activation == NO_ACTIVATION):
            activation = activation_of(func, args, kwargs)
            if activation is not None:
                return product.run(activation=activation)
        if self.fuse_residuals and len(product.residuals) < MAX_RESIDUALS:
            other = residual_of(func, args, kwargs, product.output)
            if other is not None:
                return product.run(residuals=product.residuals + (other,))
        return None
