"""Inputs of one decode step's attention, shared by the tests of the fast engine's decode attentions
(test_flash_decode.py, test_inductor_attention.py): float64, so each is checked against float64 SDPA."""
from __future__ import annotations

import torch

# (heads, kv heads, slots, head dim, hidden slots): chunk counts that are not powers of two (padding
# chunks), a last tile cut short, grouped heads, whole chunks that see nothing, one slot seen.
SHAPES = {"pythia-like": (8, 8, 300, 80, slice(100, 200)),
          "gqa": (8, 2, 200, 16, slice(0, 150)),
          "one-chunk": (4, 4, 40, 128, slice(10, 20)),
          "one-slot-seen": (2, 2, 257, 32, slice(1, None))}


def inputs(heads, kv_heads, slots, dim, hidden, seed=0, device="cpu"):
    """float64 query [1, H, 1, D], K/V [1, Hkv, C, D] and an additive mask hiding the slots in `hidden`."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, dim, generator=g, dtype=torch.float64)
               for h, n in ((heads, 1), (kv_heads, slots), (kv_heads, slots)))
    mask = torch.zeros(1, slots, dtype=torch.float64)
    mask[:, hidden] = float("-inf")
    return [x.to(device) for x in (q, k, v, mask)]
