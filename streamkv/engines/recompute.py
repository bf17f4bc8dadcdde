"""The baseline: sliding-window recomputation, no KV cache.

The first C = min(cap, T) tokens are one forward (positions 0..C−1); its logits predict tokens 1..C, and
those losses count, as in the streaming engines. Every later token t (C+1 .. T−1) is then predicted by a
fresh forward over the C tokens before it, ids[t−C : t] at positions 0..C−1, scoring only the last
logit. So every token is predicted from (up to) C tokens of true context and the predicted-token count
is T−1, the same as streaming. One window per forward, which is what a recompute-per-token generator pays
(as the seed measured): the same pass gives the perplexity and the TPOT.

`part` = (start, stop) scores only predicted tokens start..stop−1 (streamkv/shards.py splits a stream so);
every window is the same forward as in the whole run, so the parts' NLLs concatenate to the whole run's
bit for bit. A part that starts at 0 holds the whole prefill; any other starts at or after it.
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
                       progress: bool = False, part: tuple[int, int] | None = None) -> EngineResult:
    """Per-token NLL of ids [T] under sliding-window recomputation with window `cap` (module doc)."""
    if cap < 1:
        raise ValueError(f"need cap >= 1, got {cap}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    n_tokens = ids.numel()
    window = min(cap, n_tokens)
    start, stop = part or (0, n_tokens - 1)
    prefill_end = min(window, n_tokens - 1)
    if not (start == 0 and prefill_end <= stop or window <= start < stop) or stop > n_tokens - 1:
        raise ValueError(f"part {part}: a part holds the whole prefill (0..{prefill_end}) or starts after it, "
                         f"and ends by {n_tokens - 1}")
    nll = torch.empty(stop - start, dtype=as_dtype(loss_dtype), device=device)
    # Row r of the unfold is ids[r + 1 : r + 1 + C]: the window predicting token C + 1 + r (predicted index
    # C + r); this part's rows are those of its predicted indices at or after the prefill.
    first_row = max(start, window) - window
    windows = ids.unfold(0, window, 1)[1 + first_row:1 + max(stop - window, first_row)]
    targets = ids[window + 1 + first_row:]
    timer = PhaseTimer(device)
    began = time.perf_counter()
    bar = tqdm(total=stop - start, disable=not progress, desc="recompute", unit="tok")
    prefill = start == 0
    if prefill:
        timer.phase("prefill")
        logits, _ = compat.forward(model, ids[None, :window])
        nll[:prefill_end] = nll_from_logits(logits[0, :prefill_end], ids[1:prefill_end + 1], loss_dtype)
        bar.update(prefill_end)
        del logits
    timed = windows.shape[0]
    if timed:
        timer.phase("decode")
        _score_windows(model, windows, targets, nll[max(window, start) - start:], bar)
    bar.close()
    ms = timer.stop()
    return EngineResult(nll=nll.cpu(), cache_len_after_step=[], ttft_ms=ms["prefill"] if prefill else None,
                        tpot_ms=ms["decode"] / timed if timed else None,
                        wall_s=time.perf_counter() - began, peak_memory_mb=timer.peak_mb, engine="recompute")
