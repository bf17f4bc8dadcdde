"""Engines that realise a policy Schedule on a token stream; each returns an EngineResult.

Streaming engines: `evaluate(model, ids, schedule, *, position_mode, rerotation, loss_dtype, progress)`.
The baseline: `evaluate_recompute(model, ids, cap, *, loss_dtype, progress, batch_size)`.
Modules are imported on first use, so a registry entry costs nothing until its engine runs.
"""
from __future__ import annotations

import importlib

# name -> "module:function"; adding an engine is one line here.
_REGISTRY = {
    "reference": "reference:evaluate",
    "decode": "decode:evaluate",
    "recompute": "recompute:evaluate_recompute",
    "parallel": "parallel:evaluate",
    "fast": "fast:evaluate",
}


def names() -> tuple[str, ...]:
    """Registered engine names, without importing any engine (so without torch)."""
    return tuple(sorted(_REGISTRY))


def get(name: str):
    """The evaluate function of engine `name`."""
    try:
        module, function = _REGISTRY[name].split(":")
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose one of {sorted(_REGISTRY)}") from None
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)
