"""The baseline: sliding-window recomputation, no KV cache.

The first C = min(cap, T) tokens are one forward (positions 0..C−1); its logits predict tokens 1..C, and
those losses count, as in the streaming engines. Every later token t (C+1 .. T−1) is then predicted by a
fresh forward over the C tokens before it, ids[t−C : t] at positions 0..C−1, scoring only the last
logit. So every token is predicted from (up to) C tokens of true context and the predicted-token count
is T−1, the same as streaming. One window per forward, which is what a recompute-per-token generator pays
(as the seed measured): the same pass gives the perplexity and the TPOT.
"""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

from .. import compat
from ..metrics import PhaseTimer, as_dtype, nll_from_logits
from .base import EngineResult


def _score_windows(model, windows: torch.Tensor, targets: torch.Tensor, out: torch.Tensor, bar: tqdm) -> None:
    """out[i] = NLL of targets[i] after windows[i] (a [n, C] view), one window per forward."""
    for i in range(windows.shape[0]):
        logits, _ = compat.forward(model, windows[i:i + 1])
        out[i:i + 1] = nll_from_logits(logits[:, -1], targets[i:i + 1], out.dtype)
        bar.update(1)


@torch.inference_mode()
def evaluate_recompute(model, ids: torch.Tensor, cap: int, *, loss_dtype: torch.dtype | str = "float32",
                       progress: bool = False) -> EngineResult:
    """Per-token NLL of ids [T] under sliding-window recomputation with window `cap` (module doc)."""
    if cap < 1:
        raise ValueError(f"need cap >= 1, got {cap}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    n_tokens = ids.numel()
    window = min(cap, n_tokens)
    nll = torch.empty(n_tokens - 1, dtype=as_dtype(loss_dtype), device=device)
    # Row s of the unfold is ids[s : s + C]; the window predicting token t starts at s = t − C.
    windows = ids.unfold(0, window, 1)[1:n_tokens - window]
    targets = ids[window + 1:]
    timer = PhaseTimer(device)
    began = time.perf_counter()
    bar = tqdm(total=n_tokens - 1, disable=not progress, desc="recompute", unit="tok")
    timer.phase("prefill")
    logits, _ = compat.forward(model, ids[None, :window])
    scored = min(window, n_tokens - 1)
    nll[:scored] = nll_from_logits(logits[0, :scored], ids[1:scored + 1], loss_dtype)
    bar.update(scored)
    del logits
    timed = windows.shape[0]
    if timed:
        timer.phase("decode")
        _score_windows(model, windows, targets, nll[window:], bar)
    bar.close()
    ms = timer.stop()
    return EngineResult(nll=nll.cpu(), cache_len_after_step=[], ttft_ms=ms["prefill"],
                        tpot_ms=ms["decode"] / timed if timed else None,
                        wall_s=time.perf_counter() - began, peak_memory_mb=timer.peak_mb, engine="recompute")
