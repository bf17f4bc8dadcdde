"""Decode attention split over the key slots (flash-decoding), as one Triton kernel: the fast engine's
attention for one query per head on CUDA (`fast:decode_attention=flash`).

Why: torch's fused SDPA kernels grid a one-query decode by (query block, head), so at batch 1 they may run
one thread block per head, 32 blocks on a 132-SM H100, each streaming its head's whole K/V buffer (not yet
profiled: docs/bench/README.md). Here every head's slots are cut into `splits` chunks and each
(head, chunk) is one program, so hundreds of blocks read the buffer at once:

1. Program (h, s) walks its chunk in BLOCK_N-slot tiles with an online softmax: the running maximum m,
   the running sum l of exp(score − m) and the running output acc = Σ exp(score − m)·v; it writes
   (m, l, acc) of its chunk.
2. The last of a head's programs to finish rescales every chunk to the largest m and writes Σ acc / Σ l.

One kernel, not two: at a decode step's size (6.9 µs of K/V a layer on an H100) a second launch for the
combine was a visible share of the call (two kernels: 13.3 µs a layer at the best tile, SDPA 14.7;
docs/bench/h100_probe_attention.json). Each program counts itself done on its head's counter (an atomic
add, after a barrier so its whole program's stores come first); the one that counts last combines, reading
the partials from L2 (`.cg`), and sets the counter back to zero, so the counters (`counters`, one per head,
allocated once per device) are zero between calls and a CUDA graph can replay the call.

Scores are q·k · scaling + mask (additive, the ring's -inf for slots the query does not see), all in
fp32 (float64 for float64 tensors): the same function as SDPA, other rounding. Grouped-query heads read
their KV head (h // group). Triton compiles for the tensors' device; on CPU it runs only under its
interpreter (TRITON_INTERPRET=1), which is how tests/test_flash_decode.py checks it against float64 SDPA.
"""
from __future__ import annotations

import torch

from .triton_support import triton

# The launch: BLOCK_N slots per tile; about `programs` programs per call (512: ~4 per SM on an H100, enough
# to keep every SM reading); Triton's warps and pipeline stages. scripts/probe_attention.py's best on an H100
# for Pythia-2.8B at cap 2048 and 4096 (docs/bench/h100_probe_attention.json, still as two kernels: 13.3 µs a
# layer at cap 2048, where they took 20.2 at 64 slots and 4 warps and SDPA 14.7); `attend` takes any tile.
TILE = {"BLOCK_N": 128, "programs": 512, "num_warps": 2, "num_stages": 3}


def n_splits(heads: int, slots: int, tile: dict = TILE) -> int:
    """Chunks per head: about tile["programs"] programs in all, at least one tile per chunk."""
    return max(1, min(-(-tile["programs"] // heads), -(-slots // tile["BLOCK_N"])))


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _flash_decode(q, k, v, mask, m_out, l_out, acc_out, counters, out, scaling, slots, chunk, dim, group,
                      stride_qh, stride_kh, stride_kn, stride_vh, stride_vn, stride_oh,
                      SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        WORK = m_out.dtype.element_ty   # fp32, or float64 for float64 tensors (attend allocates m_out so)
        h, s = tl.program_id(0), tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < dim
        qv = tl.load(q + h * stride_qh + d, mask=d_ok, other=0.0).to(WORK)
        kv_head = h // group
        m_i = tl.full((), float("-inf"), WORK)
        l_i = tl.zeros((), WORK)
        acc = tl.zeros((BLOCK_D,), WORK)
        end = tl.minimum(s * chunk + chunk, slots)
        for tile_k in range(0, tl.cdiv(chunk, BLOCK_N)):
            n = s * chunk + tile_k * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < end
            tile = n_ok[:, None] & d_ok[None, :]
            kt = tl.load(k + kv_head * stride_kh + n[:, None] * stride_kn + d[None, :], mask=tile, other=0.0)
            # Cast back: inside a compiled graph Inductor passes the Python float `scaling` as fp64.
            score = (tl.sum(qv[None, :] * kt.to(WORK), 1) * scaling).to(WORK)
            score += tl.load(mask + n, mask=n_ok, other=0.0).to(WORK)
            score = tl.where(n_ok, score, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(score, 0))
            # A tile (or chunk) of unseen slots only: keep every exp at 0 rather than exp(-inf + inf).
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_ref)
            p = tl.exp(score - m_ref)
            vt = tl.load(v + kv_head * stride_vh + n[:, None] * stride_vn + d[None, :], mask=tile, other=0.0)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * vt.to(WORK), 0)
            m_i = m_new
        at = h * SPLITS + s
        tl.store(m_out + at, m_i)
        tl.store(l_out + at, l_i)
        tl.store(acc_out + at * BLOCK_D + d, acc)
        tl.debug_barrier()   # every warp's stores issued before the count (the atomic's release covers them)
        if tl.atomic_add(counters + h, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
            chunks = h * SPLITS + tl.arange(0, SPLITS)
            m = tl.load(m_out + chunks, cache_modifier=".cg")
            m_max = tl.max(m, 0)
            weight = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))
            total = tl.sum(weight * tl.load(l_out + chunks, cache_modifier=".cg"), 0)
            parts = tl.load(acc_out + chunks[:, None] * BLOCK_D + d[None, :], cache_modifier=".cg")
            o = tl.sum(weight[:, None] * parts, 0) / total
            tl.store(out + h * stride_oh + d, o.to(out.dtype.element_ty), mask=d_ok)
            tl.store(counters + h, 0)


def attend(query, k, v, mask, scaling, tile: dict = TILE):
    """One decode step's attention (fast.DECODE_ATTENTION): query [1, H, 1, D], k/v [1, Hkv, C, D] with unit
    stride over D, mask [1, C] additive; returns [1, H, 1, D] in v's dtype. `tile`: the launch (TILE)."""
    heads, kv_heads, slots, dim = query.shape[1], k.shape[1], k.shape[2], query.shape[-1]
    splits = n_splits(heads, slots, tile)
    # The combine kernel reduces over a power-of-two count of chunks: the padding chunks see no slot
    # (m = -inf, l = 0, acc = 0) and weigh nothing.
    padded = triton.next_power_of_2(splits)
    chunk = -(-slots // splits)
    block_d = triton.next_power_of_2(dim)
    work = torch.float64 if v.dtype == torch.float64 else torch.float32
    m, l_sum = (torch.empty(heads, padded, dtype=work, device=v.device) for _ in range(2))
    acc = torch.empty(heads, padded, block_d, dtype=work, device=v.device)
    out = torch.empty(1, heads, 1, dim, dtype=v.dtype, device=v.device)
    q = query.reshape(heads, dim)
    # chunk * padded >= slots: the programs past `splits` start beyond the last slot and write the zeros above.
    _flash_decode[(heads, padded)](q, k, v, mask, m, l_sum, acc, counters(v.device, heads), out, scaling, slots,
                                   chunk, dim, heads // kv_heads, q.stride(0), k.stride(1), k.stride(2), v.stride(1),
                                   v.stride(2), out.stride(1), SPLITS=padded, BLOCK_N=tile["BLOCK_N"],
                                   BLOCK_D=block_d, num_warps=tile["num_warps"], num_stages=tile["num_stages"])
    return out


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def counters(device: torch.device, heads: int) -> torch.Tensor:
    """A head's count of finished programs (module doc), zero between calls; allocated at a device's first
    call or by the fast engine's ring before it compiles and captures its step (inside either, a new
    tensor would be the graph's). Grown, never shrunk, for more heads."""
    held = _COUNTERS.get(device)
    if held is None or held.numel() < heads:
        held = _COUNTERS[device] = torch.zeros(heads, dtype=torch.int32, device=device)
    return held
