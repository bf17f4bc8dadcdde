"""Triton for the fast engine's own kernels (flash_decode, gemv): imported if present, and one refusal, up
front, of what they could not run."""
from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:   # CPU-only torch wheels ship no Triton: check_runs_on then says so
    triton = None


def check_runs_on(device: torch.device, option: str, instead: str) -> None:
    """Refuse in one line what a Triton kernel could not run: no Triton, or CPU tensors outside Triton's
    interpreter. `option` names the engine option that asked for it, `instead` the default to use."""
    if triton is None:
        raise RuntimeError(f"{option} needs Triton (torch's CUDA wheels bring it); use {instead}")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{option} runs on CUDA (on {device.type} only under TRITON_INTERPRET=1, for tests); "
                           f"use {instead}")
