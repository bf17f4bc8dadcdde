"""Honest numbers: per-token NLL, perplexity, analytic KV bytes, phase timing and peak memory.

- NLL: log-softmax in fp32 (or float64 on request) for every predicted token, prefill included; the
  perplexity sums in fp64 and reports how many tokens it averaged.
- Timing: on CUDA, events are recorded between phases and read after ONE synchronize at the end, so the
  timed loop never waits for the device; on CPU, perf_counter. Warm-up is the caller's job (run the
  engine once untimed first: cuDNN/SDPA plans and allocator growth otherwise land in the first phase).
- Memory: the CUDA allocator's peak, reset at the start of every phase. The allocator counts on the host
  when a kernel is queued, so reading it needs no sync either. On CPU there is no such statistic: None.
"""
from __future__ import annotations

import math
import time

import torch


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept "float32" (as RunSpec stores it) or torch.float32."""
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def nll_from_logits(logits: torch.Tensor, targets: torch.Tensor,
                    dtype: torch.dtype | str = torch.float32) -> torch.Tensor:
    """Per-token NLL [n] of targets [n] under logits [n, vocab], log-softmax computed in `dtype`.

    fp16 logits are upcast BEFORE the log-softmax: a half-precision logsumexp over 50k entries loses
    about three digits of the loss.
    """
    logp = torch.log_softmax(logits.to(as_dtype(dtype)), dim=-1)
    return -logp.gather(-1, targets[:, None]).squeeze(-1)


def perplexity(nll: torch.Tensor) -> tuple[float, float, int]:
    """(exp(mean NLL), NLL sum accumulated in fp64, number of predicted tokens)."""
    n = nll.numel()
    if n == 0:
        raise ValueError("perplexity of zero predicted tokens")
    total = float(nll.to(torch.float64).sum())
    return math.exp(total / n), total, n


def kv_cache_bytes(config, n_tokens: int, dtype: torch.dtype | str) -> int:
    """Bytes of K and V for `n_tokens` cached tokens: layers × 2 × kv_heads × head_dim × bytes × tokens."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    itemsize = torch.empty((), dtype=as_dtype(dtype)).element_size()
    return config.num_hidden_layers * 2 * kv_heads * head_dim * itemsize * n_tokens


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def reset_peak_memory(device) -> None:
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device) -> float | None:
    """Peak CUDA memory allocated since the last reset, in MiB; None on CPU."""
    if not _is_cuda(device):
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


class PhaseTimer:
    """Wall time and peak memory of consecutive phases (e.g. "prefill", "decode") without mid-run syncs.

    `phase(name)` closes the running phase and opens the next; `stop()` closes the last one, synchronizes
    once and returns {name: ms}. `peak_mb` is {name: MiB} on CUDA, None on CPU.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = _is_cuda(self.device)
        self._marks: list[tuple[str | None, object]] = []
        self.peak_mb: dict[str, float] | None = {} if self.cuda else None

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _close_running(self) -> None:
        if self.cuda and self._marks:
            self.peak_mb[self._marks[-1][0]] = peak_memory_mb(self.device)

    def phase(self, name: str) -> None:
        if any(name == seen for seen, _ in self._marks):
            raise ValueError(f"phase {name!r} was already timed; phases are consecutive and named once")
        self._close_running()
        self._marks.append((name, self._mark()))
        reset_peak_memory(self.device)

    def stop(self) -> dict[str, float]:
        self._close_running()
        self._marks.append((None, self._mark()))
        if self.cuda:
            torch.cuda.synchronize(self.device)
            elapsed = [a.elapsed_time(b) for (_, a), (_, b) in zip(self._marks, self._marks[1:])]
        else:
            elapsed = [(b - a) * 1e3 for (_, a), (_, b) in zip(self._marks, self._marks[1:])]
        return {name: ms for (name, _), ms in zip(self._marks, elapsed)}
