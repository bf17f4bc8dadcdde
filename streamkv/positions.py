"""Key re-rotation for the `cache` position mode (StreamingLLM pos-shift).

HF caches keys AFTER rotary, at the angle of the position they were computed at. When a prune moves a
kept key to another slot, its angle must follow. `rotate` turns keys by a per-token position delta in one
shot, in fp32 arithmetic (float64 for float64 keys). Engines always rotate from the angle a key was
computed at (they keep that original key), so a key is never rotated twice in low precision.

The seed instead rotated the fp16 cache in place by a small delta at every prune; over ~1000 shifts the
composed fp16 rounding drifts by up to 17%. That behaviour is kept only as the recorded ablation
`rerotation=composed_fp16` (see `compose_fp16`).
"""
from __future__ import annotations

import torch

from .compat import Rotary

def _angles(delta: torch.Tensor, rot: Rotary, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = rot.inv_freq.to(device=delta.device, dtype=dtype)
    freqs = delta.to(dtype)[:, None] * inv[None, :]           # [n, rot/2]
    emb = torch.cat((freqs, freqs), dim=-1)                    # rotate_half layout: i pairs with i + rot/2
    return emb.cos(), emb.sin()


def rotate(keys: torch.Tensor, delta: torch.Tensor, rot: Rotary, work: torch.dtype | None = None) -> torch.Tensor:
    """Rotate keys [..., n, head_dim] by position deltas [n] (new position − position computed at).

    Arithmetic runs in `work`: fp32 by default, float64 for float64 keys.
    """
    if work is None:
        work = torch.float64 if keys.dtype == torch.float64 else torch.float32
    cos, sin = _angles(delta, rot, torch.float64 if work == torch.float64 else torch.float32)
    cos, sin = cos.to(work), sin.to(work)
    k = keys.to(work)
    k_rot, k_pass = k[..., :rot.rot_dims], k[..., rot.rot_dims:]
    half = rot.rot_dims // 2
    rotated_half = torch.cat((-k_rot[..., half:], k_rot[..., :half]), dim=-1)
    out = torch.cat((k_rot * cos + rotated_half * sin, k_pass), dim=-1)
    return out.to(keys.dtype)


def compose_fp16(keys: torch.Tensor, delta: torch.Tensor, rot: Rotary) -> torch.Tensor:
    """The seed's re-rotation: the small delta applied to the cached key with fp16 cos/sin and fp16
    arithmetic (HF hands rotary cos/sin over in the model dtype), so each prune compounds its rounding."""
    return rotate(keys.to(torch.float16), delta, rot, work=torch.float16).to(keys.dtype)
