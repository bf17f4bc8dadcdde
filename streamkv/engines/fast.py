"""Fast exact decode engine: a static ring KV buffer, eviction as index arithmetic, one captured step.

It decodes token by token like `decode` and computes the same function (contiguous schedules: sinks plus
one recent run), but nothing changes shape between tokens, so on CUDA the whole one-token step is
captured once as a CUDA graph and replayed with no host work.

Buffer. S sink slots (S = the most sinks the schedule ever keeps) hold tokens [0, S) for the whole stream;
a ring of `ring` slots holds every later token j at slot S + (j − S) mod ring. `ring` is the longest
recent run any query sees (soft + R − S for lazy R), so a token is overwritten only once no query can see
it. A prune writes nothing: query t sees the slots whose token lies in [start(t), t] plus the sink slots
below n_sink(t), where start and n_sink are the schedule's per-token counters (engines/contiguous.py),
kept on the device and read by the step index t, itself a device tensor incremented inside the graph.

Positions. Attention scores depend on position differences only.
- Recent keys: in `cache` mode query t sits at P(t) = n_sink + t − start and recent key j at slot
  n_sink + j − start, a distance of t − j, the distance of their original indices. So every query and
  every key is rotated once, at its ORIGINAL index, when it is computed, and never again.
- Sinks: sink i sits at slot i, a distance of P(t) − i = t − (i + o(t)) with o(t) = t − P(t) = start −
  n_sink. So at every decode step each layer rotates its S sink keys to i + o(t) from a raw (unrotated)
  copy, with angles looked up once per step; a schedule that never evicts keeps no sink slots (S = 0) and
  skips this. In `absolute` mode o = 0 and the sinks never move.
- Angles at original indices reach the stream length (~20k), where HF's fp32 angles are off by up to
  ~1e-3 rad; so this engine builds its own cos/sin tables in float64 and casts them once. HF's own rotary
  runs at position 0 (cos = 1, sin = 0: an exact identity) and our attention function applies ours.
The reference engine places every key at its slot instead; tests/test_fast.py checks that both agree.

Refused up front (Unsupported): refresh tokens (not one contiguous run) and the composed_fp16 ablation
(its drift comes from re-rotating the cache at every prune, which this engine never does).
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AttentionInterface

from .. import compat, compile_cache
from ..metrics import PhaseTimer, as_dtype, nll_from_logits
from ..policies.schedule import Schedule
from ..spec import REROTATIONS
from . import flash_decode, gemv_fusion
from .attention import swapped_attention
from .base import EngineResult
from .contiguous import StreamPlan, Unsupported, stream_plan
from .triton_support import check_runs_on

ATTN_IMPLEMENTATION = "streamkv_fast"
CAPACITY_MULTIPLE = 128        # buffer slots are rounded up to this (ring_layout)
STREAM_MULTIPLE = 8192         # per-token tables are padded to a multiple of this (table_length)
GRAPH_WARMUP_STEPS = 3          # eager steps on a side stream before capture (CUDA's graph recipe)
PROGRESS_EVERY = 256            # replays between progress-bar updates


def ring_layout(plan: StreamPlan, multiple: int | None = None) -> tuple[int, int]:
    """(sink slots S, ring slots): a buffer in which no visible token is ever overwritten. Query t sees
    ring tokens [max(start(t), S), t]; they must fall into distinct slots mod ring. The smallest such
    ring is widened until S + ring is a multiple of `multiple` (CAPACITY_MULTIPLE), so that the schedules
    of one comparison (strict, lazy R <= 128 at one cap) share buffer shapes and so one compiled step."""
    multiple = CAPACITY_MULTIPLE if multiple is None else multiple
    sinks = plan.max_sinks
    t = torch.arange(plan.start.numel())
    capacity = sinks + max(int((t + 1 - plan.start.clamp(min=sinks)).max()), 1)
    return sinks, -(-capacity // multiple) * multiple - sinks


def table_length(n_tokens: int) -> int:
    """Rows of the per-token device tables (ids, schedule counters, angles, NLL) for a stream of n_tokens:
    rounded up to STREAM_MULTIPLE. The compiled step reads these tables whole, so their length is part of its
    shape: unpadded, the timing prefix (C + timing_tokens + 1: 2561 tokens in the paper profile, 4097 when it
    timed 2048) and WikiText's whole stream (4096) each compiled a step of their own (about 40 s apiece on an
    H100, in the paper profile's main stage alone). Rows past the stream are never read: step t reads rows t
    and t + 1, and the last token fed is T − 2."""
    return -(-n_tokens // STREAM_MULTIPLE) * STREAM_MULTIPLE


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat((x, x.new_zeros(rows - x.shape[0], *x.shape[1:])))


def slot_of(tokens: torch.Tensor, sinks: int, ring: int) -> torch.Tensor:
    """Buffer slot of each token index: sinks stay put, later tokens go round the ring."""
    return torch.where(tokens < sinks, tokens, sinks + (tokens - sinks) % ring)


def sink_offset(plan: StreamPlan, position_mode: str) -> torch.Tensor:
    """o(t) per fed token: sink i is rotated to position i + o(t) for query t (module doc)."""
    return plan.offset if position_mode == "cache" else torch.zeros_like(plan.offset)


def rotary_tables(rotary: compat.Rotary, n_positions: int, dtype: torch.dtype, device):
    """cos, sin [n_positions, rot_dims] (rotate_half layout), angles computed in float64, then cast."""
    angle = torch.arange(n_positions, dtype=torch.float64)[:, None] * rotary.inv_freq.double()[None, :]
    angle = torch.cat((angle, angle), dim=-1)
    return angle.cos().to(device, dtype), angle.sin().to(device, dtype)


def turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., n, head_dim] with its first rot_dims rotated by the angles of cos/sin [n, rot_dims],
    computed in cos's dtype (fp32, or float64 for float64 models) and returned in x's dtype."""
    rd = cos.shape[-1]
    r = x[..., :rd].to(cos.dtype)
    rotated_half = torch.cat((-r[..., rd // 2:], r[..., :rd // 2]), dim=-1)
    return torch.cat(((r * cos + rotated_half * sin).to(x.dtype), x[..., rd:]), dim=-1)


# How a decode step attends (the prefill always uses SDPA). `flash` is the issue-17 candidate: SDPA on an H100
# ran 1.54x the bandwidth floor end to end, and Inductor's version of a split over the slots (two reductions)
# was slower still (1.65x; docs/bench/README.md); `flash` is timed by
# `scripts/bench_decode.py --engines fast,fast:decode_attention=flash` and becomes the default on CUDA if faster.
DECODE_ATTENTION = {"sdpa": lambda q, k, v, mask, scaling: F.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask, scale=scaling, enable_gqa=q.shape[1] != k.shape[1]),
                    "flash": flash_decode.attend}


# How a decode step's linears run: `torch` (F.linear: cuBLAS on CUDA) or `triton` (engines/gemv.py, CUDA).
# `triton` is the CUDA default (`default_linear`): in the whole captured step on an H100 it took 241 µs off
# cuBLAS's (strict 3.153 -> 2.912 ms, 1.537x -> 1.419x the anchor's floor, eviction overhead 1.007;
# docs/bench/h100_bench_gemv_stop29.json, `scripts/bench_decode.py --engines fast,fast:linear=triton`).
# `triton_activation` also applies the MLP's activation inside the GEMV, `triton_fused` also the layer norm
# before a linear and the residual sums after one (gemv_fusion.py's module doc): CPU-tested, not yet timed
# on a GPU.
LINEARS = {"torch": contextlib.nullcontext, "triton": gemv_fusion.OneRowLinears,
           "triton_activation": functools.partial(gemv_fusion.OneRowLinears, fuse_activations=True),
           "triton_fused": functools.partial(gemv_fusion.OneRowLinears, fuse_activations=True, fuse_norms=True,
                                             fuse_residuals=True)}


def default_linear(device: torch.device) -> str:
    """The Triton GEMV on CUDA; F.linear elsewhere (on CPU Triton runs only under its interpreter, for tests)."""
    return "triton" if device.type == "cuda" else "torch"


class _Ring:
    """The ring KV buffer and the device-side state of one stream; serves the attention function.

    A layer's K and V are one tensor [2, 1, Hkv, slots, D], written in place with one index_copy_ (the
    pattern of HF's StaticCache): torch.compile keeps such writes in place, while a write into a slice of
    one all-layer tensor makes it copy the whole buffer at every layer. One tensor, so that a decode step
    writes the new key, its value and the re-rotated sink keys with one scatter, one kernel a layer, where
    separate K and V writes took three on an H100 (docs/bench/h100_profile_step_gemv.json: 1.3 µs each)."""

    def __init__(self, model, ids: torch.Tensor, plan: StreamPlan, position_mode: str,
                 decode_attention: str = "sdpa"):
        cfg, param = model.config, next(model.parameters())
        device, dtype = param.device, param.dtype
        rotary = compat.rotary(model)
        self.sinks, self.ring = ring_layout(plan)
        capacity = self.sinks + self.ring
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        shape = (2, 1, kv_heads, capacity, rotary.head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        # Sink keys as computed (unrotated), each decode step turns them to their current position, and
        # sink values, which that step's scatter writes back unchanged beside them.
        self.sink_raw = [torch.zeros(shape[:3] + (self.sinks, shape[4]), dtype=dtype, device=device)
                         for _ in range(cfg.num_hidden_layers)]
        self.gqa = kv_heads != heads
        self.decode_attention = DECODE_ATTENTION[decode_attention]
        if decode_attention == "flash":
            flash_decode.counters(device, heads)   # now, not inside the compiled or captured step
        work = torch.float64 if dtype == torch.float64 else torch.float32
        self.rows = table_length(ids.numel())
        self.cos_table, self.sin_table = rotary_tables(rotary, self.rows, work, device)
        # Per-token counters of the schedule, on the device: the step reads them at index t.
        self.ids = _padded(ids, self.rows).to(device)
        self.start, self.n_sink = _padded(plan.start, self.rows).to(device), _padded(plan.n_sink, self.rows).to(device)
        self.sink_shift = _padded(sink_offset(plan, position_mode), self.rows).to(device)
        self.slot = slot_of(torch.arange(self.rows), self.sinks, self.ring).to(device)
        self.slot_index = torch.arange(capacity, device=device)
        self.sink_index = torch.arange(self.sinks, device=device)
        self.slot_token = torch.full((capacity,), -1, dtype=torch.long, device=device)
        # What `prepare` sets for the forward that follows: write slots, additive mask and angles of its
        # tokens, and the sinks' angles.
        self.write: torch.Tensor | None = None
        self.write_with_sinks: torch.Tensor | None = None   # a decode step's: sink slots, then write
        self.mask: torch.Tensor | None = None
        self.cos = self.sin = self.sink_cos = self.sink_sin = None
        self.prefill = False
        self.calls = 0

    def prepare(self, t: torch.Tensor, *, prefill: bool) -> None:
        """Device work before the forward of tokens t [Q]: claim their slots, build the mask, sink angles."""
        self.prefill = prefill
        self.write = self.slot.index_select(0, t)
        self.slot_token.index_copy_(0, self.write, t)
        start, n_sink = self.start.index_select(0, t), self.n_sink.index_select(0, t)
        held = self.slot_token[None, :]
        seen = ((held >= start[:, None]) & (held <= t[:, None])) | (self.slot_index[None, :] < n_sink[:, None])
        # Additive, in the model's dtype, built once per step: a boolean mask would be converted per layer.
        dtype = self.kv[0].dtype
        self.mask = torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill(~seen, float("-inf"))
        self.cos, self.sin = self.cos_table.index_select(0, t), self.sin_table.index_select(0, t)
        if self.sinks and not prefill:
            # One token per decode step, so one offset: sink i goes to position i + o(t).
            at = self.sink_index + self.sink_shift.index_select(0, t)
            self.sink_cos, self.sink_sin = self.cos_table.index_select(0, at), self.sin_table.index_select(0, at)
            self.write_with_sinks = torch.cat((self.sink_index, self.write))

    def attend(self, layer: int, query, key, value, scaling):
        kv, raw = self.kv[layer], self.sink_raw[layer]
        if self.prefill:
            self.calls += 1
            if self.sinks:
                raw.copy_(torch.stack((key[..., :self.sinks, :], value[..., :self.sinks, :])))
        query = turn(query, self.cos, self.sin)
        new = torch.stack((turn(key, self.cos, self.sin), value))
        if self.sinks and not self.prefill:
            sinks = torch.stack((turn(raw[0], self.sink_cos, self.sink_sin), raw[1]))
            kv.index_copy_(3, self.write_with_sinks, torch.cat((sinks, new), dim=3))
        else:
            kv.index_copy_(3, self.write, new)
        k, v = kv[0], kv[1]
        if self.prefill:
            out = F.scaled_dot_product_attention(query, k, v, attn_mask=self.mask, scale=scaling, enable_gqa=self.gqa)
        else:
            out = self.decode_attention(query, k, v, self.mask, scaling)
        return out.transpose(1, 2).contiguous()


class _Active:
    """The ring of the evaluation in progress. A plain attribute, not a ContextVar: torch.compile traces
    through an attribute read but breaks its graph at a ContextVar. `evaluate` sets and clears it."""

    ring: _Ring | None = None


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry: query [B, H, Q, D], key/value [B, Hkv, Q, D] (HF's rotary at position 0,
    the identity); returns ([B, Q, H, D], no weights)."""
    ring = _Active.ring
    if ring is None:
        raise RuntimeError(f"attention implementation {ATTN_IMPLEMENTATION!r} only runs inside "
                           "streamkv.engines.fast.evaluate")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return ring.attend(module.layer_idx, query, key, value, scaling), None


AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)


class _Stream:
    """Prefill and the one-token step of one evaluation; the step is what a CUDA graph captures."""

    def __init__(self, model, ring: _Ring, prefill_len: int, nll: torch.Tensor, loss_dtype, linear: str):
        self.model, self.ring, self.prefill_len, self.linears = model, ring, prefill_len, LINEARS[linear]
        self.nll, self.loss_dtype = nll, loss_dtype
        device = ring.ids.device
        self.t = torch.tensor([prefill_len], device=device)    # the next token to feed
        self.zero_position = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.n_layers = model.config.num_hidden_layers

    def _forward(self, t: torch.Tensor, *, prefill: bool) -> None:
        ring = self.ring
        ring.prepare(t, prefill=prefill)
        logits, _ = compat.forward(self.model, ring.ids.index_select(0, t)[None],
                                   position_ids=self.zero_position.expand(1, t.numel()))
        # Only tokens that predict one are fed (t <= T − 2), so every logit row is scored.
        self.nll.index_copy_(0, t, nll_from_logits(logits[0], ring.ids.index_select(0, t + 1), self.loss_dtype))

    def prefill(self) -> None:
        """From an empty buffer: forget every slot, feed tokens [0, prefill_len), rewind t. The prefill runs
        eagerly and counts the layers that reach the ring (decode steps reuse the same route)."""
        ring = self.ring
        ring.slot_token.fill_(-1)
        self.t.fill_(self.prefill_len)
        ring.calls = 0
        self._forward(torch.arange(self.prefill_len, device=self.t.device), prefill=True)
        if ring.calls != self.n_layers:
            raise RuntimeError(f"{ring.calls} of {self.n_layers} attention layers used the fast attention "
                               "function; the others would ignore the ring buffer")

    def step(self) -> None:
        """Feed token t, score it, t += 1: device work only, so CUDA can capture it."""
        with self.linears():
            self._forward(self.t, prefill=False)
        self.t += 1


def _capture(step) -> torch.cuda.CUDAGraph:
    """CUDA's recipe: a few steps on a side stream (compilation, allocator and kernel choices settle),
    then capture one step. Those steps move the state on; the caller runs the prefill again afterwards."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP_STEPS):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def check_supported(schedule: Schedule, position_mode: str, rerotation: str) -> StreamPlan:
    if rerotation not in REROTATIONS:
        raise ValueError(f"unknown rerotation {rerotation!r}; choose one of {REROTATIONS}")
    if position_mode == "cache" and rerotation != "exact":
        raise Unsupported(f"rerotation={rerotation!r} replays the rounding drift of re-rotating the cache at "
                          "every prune, which only the decode engine does")
    return stream_plan(schedule, position_mode, "fast")


@torch.inference_mode()
def evaluate(model, ids: torch.Tensor, schedule: Schedule, *, position_mode: str = "cache",
             rerotation: str = "exact", loss_dtype: torch.dtype | str = "float32", progress: bool = False,
             graph: bool | None = None, compile: bool | None = None, decode_attention: str = "sdpa",
             linear: str | None = None) -> EngineResult:
    """Per-token NLL and timings of `schedule` on `ids` [T], equal to the reference engine's (module doc).

    graph: capture the step as a CUDA graph (default: on CUDA). compile: torch.compile the step before
    capturing it (default: with graph), which fuses the many small element-wise kernels of a one-token
    forward (layer norms, both rotaries, residual adds); without graph (CPU) the compiled step is called
    from Python. Compilation is paid once per buffer shape and process (streamkv/compile_cache.py).
    decode_attention: how a decode step attends, `sdpa` (torch's fused kernels, which the prefill always
    uses) or `flash` (engines/flash_decode.py, CUDA). linear: how a decode step's one-row linears run, `torch`
    (F.linear), `triton` (engines/gemv.py; None: `default_linear`, the GEMV on CUDA), `triton_activation` (the
    GEMV with the MLP's activation inside) or `triton_fused` (also the layer norm before a linear and the
    residual sums after one). graph, compile, decode_attention and linear are benchmark diagnostics: the same
    function, other kernels (fp16 rounding).
    TTFT is the prefill forward; TPOT the mean decode step; compilation, warm-up and capture run before the
    timed prefill."""
    plan = check_supported(schedule, position_mode, rerotation)
    device = next(model.parameters()).device
    graph = device.type == "cuda" if graph is None else graph
    compile = graph if compile is None else compile
    linear = default_linear(device) if linear is None else linear
    began = time.perf_counter()
    n_fed = schedule.n_tokens - 1
    # The schedule's prefill may include the stream's last token, which predicts nothing: not fed here.
    n_prefill = min(schedule.prefill_len, n_fed)
    n_decode = n_fed - n_prefill
    if decode_attention not in DECODE_ATTENTION:
        raise ValueError(f"unknown decode_attention {decode_attention!r}; choose one of {tuple(DECODE_ATTENTION)}")
    if linear not in LINEARS:
        raise ValueError(f"unknown linear {linear!r}; choose one of {tuple(LINEARS)}")
    if decode_attention == "flash":
        check_runs_on(device, "decode_attention='flash'", "'sdpa'")
    if linear != "torch":
        check_runs_on(device, f"linear={linear!r}", "'torch'")
    ring = _Ring(model, ids, plan, position_mode, decode_attention)
    nll = torch.zeros(ring.rows, dtype=as_dtype(loss_dtype), device=device)   # rows past n_fed stay unread
    stream = _Stream(model, ring, n_prefill, nll, as_dtype(loss_dtype), linear)
    _Active.ring = ring
    try:
        with swapped_attention(model, ATTN_IMPLEMENTATION, "fast"):
            step = stream.step
            # Compiling and capturing run steps of the stream itself (a capture GRAPH_WARMUP_STEPS of them),
            # before the timed prefill, which rewinds what they moved on; a stream shorter than that (tests,
            # tiny runs) decodes eagerly: the same step, the same numbers.
            if (graph or compile) and n_decode > GRAPH_WARMUP_STEPS:
                stream.prefill()
                step = compile_cache.compiled(stream.step) if compile else stream.step
                if graph:
                    step = _capture(step).replay
                else:
                    step()   # compiles now, not inside the timed decode
            timer = PhaseTimer(device)
            timer.phase("prefill")
            stream.prefill()
            timer.phase("decode")
            bar = tqdm(total=n_fed, initial=n_prefill, disable=not progress, desc="fast", unit="tok")
            for k in range(n_decode):
                step()
                if progress and (k + 1) % PROGRESS_EVERY == 0:
                    bar.update(PROGRESS_EVERY)
            bar.update(n_fed - bar.n)
            bar.close()
            ms = timer.stop()
    finally:
        _Active.ring = None
    return EngineResult(nll=nll[:n_fed].cpu(), cache_len_after_step=schedule.cache_len_after_step,
                        ttft_ms=ms["prefill"], tpot_ms=ms["decode"] / n_decode if n_decode else None,
                        wall_s=time.perf_counter() - began, peak_memory_mb=timer.peak_mb, engine="fast")
