"""Running a model with one of our attention functions, through transformers' AttentionInterface.

An engine registers its function once under its own name and wraps its forwards in `swapped_attention`.
transformers 4.56+ and 5.x both dispatch through `config._attn_implementation` and both skip mask creation
for an implementation without a registered mask function, so no T×T mask is ever built. Nothing of the
model is patched: the previous implementation is restored on exit.
"""
from __future__ import annotations

import contextlib

from .contiguous import Unsupported


@contextlib.contextmanager
def swapped_attention(model, implementation: str, engine: str):
    previous = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        if model.config._attn_implementation != implementation:
            # transformers only warns for models whose attention does not go through AttentionInterface.
            raise Unsupported(f"{type(model).__name__} cannot switch to a custom attention function, which "
                              f"the {engine} engine needs: use the decode engine")
        yield
    finally:
        model.set_attn_implementation(previous)
