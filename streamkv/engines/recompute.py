"""The baseline: sliding-window recomputation, no KV cache.

The first C = min(cap, T) tokens are one forward (positions 0..C−1); its logits predict tokens 1..C, and
those losses count, as in the streaming engines. Every later token t (C+1 .. T−1) is then predicted by a
fresh forward over the C tokens before it, ids[t−C : t] at positions 0..C−1, scoring only the last
logit. So every token is predicted from (up to) C tokens of true context and the predicted-token count
is T−1, the same as streaming. The same pass gives the perplexity and the TPOT (decode time / windows).

Batching. `batch` = B windows go through one forward, as a [B, C] batch: every window has C tokens, so
there is no padding and no mask is needed. Every forward runs HF's SDPA attention under
engines/attention.py's UNMASKED_SDPA (`unmasked_attention`), which transformers hands no mask, so SDPA
runs with is_causal=True, the path of the flash / cuDNN kernels on CUDA, on every transformers line and
under torch.compile (HF's own "sdpa" builds an explicit causal mask for these forwards on 4.57 and
whenever it is traced). The LM head runs on each window's last position only (compat.last_logits): the
other C − 1 positions predict nothing. B = 1 is one window per forward, what a
recompute-per-token generator pays (as the seed measured). B changes the forwards' shapes, so on a GPU
the fp16 GEMMs may round differently: RunSpec.recompute_batch is part of the config hash (streamkv/runspec.py).

Memory of one forward on top of the weights (inference mode keeps one layer's activations at a time; the
widest point is a GPT-NeoX parallel-residual MLP: the residual, the attention output, the normed input,
the up projection and its activation): about B · C · (3·d + 2·d_ff) · bytes of the dtype, d the hidden
size, d_ff the MLP width (4·d for Pythia, so 11·d). Pythia-2.8B (d = 2560), C = 2048, fp16: 115 MB per
window, 1.8 GB at B = 16; Pythia-6.9B at C = 4096: 0.37 GB per window. Flash attention adds nothing
quadratic; SDPA's math fallback would add B · heads · C² · bytes per layer (268 MB per Pythia-2.8B window).

`compile` runs the batched forwards through torch.compile (streamkv/compile_cache.py): Inductor fuses the
element-wise work eager leaves in separate kernels (6.6 of a window's 23.6 ms on an H100, stop 28). The
last batch of a stream is padded with copies of its last window to B rows, so a compiled run sees one
window shape (a second would be a second compile); the copies' logits are dropped. Off by default until a
card times it against eager (scripts/probe_recompute_compile.py, docs/bench/README.md): the same
function, other kernels (fp16 rounding).

`part` = (start, stop) scores only predicted tokens start..stop−1 (streamkv/shards.py splits a stream so).
Batches are aligned to the whole run's windows (batch k holds windows kB .. kB+B−1 of the stream), so a
part computes each of its windows in the very forward the whole run computes it in (same inputs, same
shapes) and the parts' NLLs concatenate to the whole run's bit for bit; shards.ranges cuts at batch
boundaries, so no part forwards a window it does not score. A part that starts at 0 holds the whole
prefill; any other starts at or after it.
"""
from __future__ import annotations

import functools
import time

import torch
from tqdm import tqdm

from .. import compat, compile_cache
from ..metrics import PhaseTimer, as_dtype, nll_from_logits
from .attention import UNMASKED_SDPA, swapped_attention
from .base import EngineResult


def unmasked_attention(model):
    """Every recompute forward's attention: HF's SDPA handed no mask (attention.UNMASKED_SDPA, module doc)."""
    return swapped_attention(model, UNMASKED_SDPA, "recompute",
                             "it runs models whose attention dispatches through transformers' AttentionInterface")


def _batch_at(windows: torch.Tensor, begin: int, batch: int, padded: bool) -> torch.Tensor:
    """The windows of the batch that starts at `begin`; `padded`: always `batch` rows, the last repeated, and
    contiguous (the windows are overlapping views of the stream, a padded batch a copy: both the same
    strides, or the compiled forward's guards would see two layouts)."""
    chunk = windows[begin:begin + batch]
    if not padded:
        return chunk
    return torch.cat((chunk, chunk[-1:].expand(batch - len(chunk), -1)))


def _score_windows(forward, windows: torch.Tensor, targets: torch.Tensor, rows: range, batch: int,
                   out: torch.Tensor, bar: tqdm, *, padded: bool) -> None:
    """out[r − rows.start] = NLL of targets[r] after windows[r] ([n, C], every window of the stream) for r in
    `rows`, through forward(batch of windows) -> last logits over the globally aligned batches that hold
    them; `padded`: every forward gets `batch` rows (module doc)."""
    for begin in range(rows.start - rows.start % batch, rows.stop, batch):
        logits = forward(_batch_at(windows, begin, batch, padded))
        lo, hi = max(begin, rows.start), min(begin + batch, rows.stop)
        out[lo - rows.start:hi - rows.start] = nll_from_logits(logits[lo - begin:hi - begin], targets[lo:hi],
                                                               out.dtype)
        bar.update(hi - lo)


@torch.inference_mode()
def evaluate_recompute(model, ids: torch.Tensor, cap: int, *, loss_dtype: torch.dtype | str = "float32",
                       progress: bool = False, part: tuple[int, int] | None = None,
                       batch: int = 1, compile: bool = False) -> EngineResult:
    """Per-token NLL of ids [T] under sliding-window recomputation with window `cap`, `batch` windows per
    forward, compiled or not (module doc)."""
    if cap < 1 or batch < 1:
        raise ValueError(f"need cap >= 1 and batch >= 1, got {cap}, {batch}")
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
    windows = ids.unfold(0, window, 1)[1:n_tokens - window]
    targets = ids[window + 1:]
    first_row = max(start, window) - window
    rows = range(first_row, max(stop - window, first_row))
    began = time.perf_counter()
    prefill = start == 0
    with unmasked_attention(model):
        forward = functools.partial(compat.last_logits, model)
        if compile and rows:
            forward = compile_cache.compiled(forward)
            forward(_batch_at(windows, 0, batch, padded=True))   # compiles now, not inside the timed decode
        timer = PhaseTimer(device)
        bar = tqdm(total=stop - start, disable=not progress, desc="recompute", unit="tok")
        if prefill:
            timer.phase("prefill")
            logits, _ = compat.forward(model, ids[None, :window])
            nll[:prefill_end] = nll_from_logits(logits[0, :prefill_end], ids[1:prefill_end + 1], loss_dtype)
            bar.update(prefill_end)
            del logits
        if rows:
            timer.phase("decode")
            _score_windows(forward, windows, targets, rows, batch, nll[max(window, start) - start:], bar,
                           padded=compile)
    bar.close()
    ms = timer.stop()
    return EngineResult(nll=nll.cpu(), cache_len_after_step=[], ttft_ms=ms["prefill"] if prefill else None,
                        tpot_ms=ms["decode"] / len(rows) if rows else None,
                        wall_s=time.perf_counter() - began, peak_memory_mb=timer.peak_mb, engine="recompute")
