"""Where the Triton kernels' tests run: compiled on a GPU, or on a CPU under Triton's interpreter
(TRITON_INTERPRET=1, which `make test-flash-decode` sets, with Triton from requirements-triton.lock)."""
from __future__ import annotations

import os

import pytest
import torch

from streamkv.engines.triton_support import triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"


def skip_module_without_triton() -> None:
    """Skip the calling test module (with the reason) where its kernels can run neither way."""
    if triton is None or not (torch.cuda.is_available() or INTERPRETED):
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 with Triton installed: `make test-flash-decode`",
                    allow_module_level=True)
