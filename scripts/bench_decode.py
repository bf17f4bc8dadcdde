"""Decode speed of the engines under the timing protocol (streamkv/timing.py), and fast-vs-decode agreement.

    python3 scripts/bench_decode.py --out bench_decode.json --anchor anchor.json   # GPU, Pythia-2.8B shape
    python3 scripts/bench_decode.py --tiny                                           # CPU, demo model shape
    python3 scripts/bench_decode.py --engines '' --recompute-batches 1,16 --anchor anchor.json   # the baseline

Run it in the same call as ../shared/bench/hf_anchor.py (its JSON passed as --anchor), so the ratios
compare numbers from one card. Model: random fp16 weights of the Pythia-2.8B architecture (they cost
exactly what real ones do); stream: random token ids. Every run prefills `cap` tokens and decodes
--steps tokens one per forward, computing every token's loss, as an evaluation does.

Variants per engine: `dense` (R = 0, no eviction: the cache grows from cap), `strict` (S=--sink, R=1,
Start+Recent) and `lazy{R}` (R=--lazy-r). Cache position mode, exact re-rotation.
Protocol: per engine, --warmup untimed runs of every variant, then --repeats rounds that run the variants
in turn; TPOT is the median over the rounds, ± half the range. The fast engine's protocol is run
--stability-runs times in a row, to show how far its medians move from run to run.
Reported: TPOT per engine and variant, eviction overhead (TPOT with eviction / TPOT of dense), and with
--anchor: TPOT over the bandwidth floor and the plain-HF figures over ours. Agreement: the first engine's
per-token NLL against decode's on the same prefix (fp16: rounding differs, so this is a noise figure).

--recompute-batches B1,B2,...: the recompute baseline (streamkv/engines/recompute.py) on the same stream,
one variant per batch size (windows per forward), run in turn under the same protocol: --steps windows of
`cap` tokens, TPOT = decode time / windows. Reported beside each: peak memory, the per-token NLL against the
first batch size's (fp16 GEMMs of other shapes may round differently: a noise figure) and, with --anchor,
the anchor's recompute_ms over ours. --recompute-compile adds each batch size with its forwards compiled
(`batch{B}_compiled`; the compile runs before the timed decode, in the warm-up's first run).

--inductor KEY=VALUE,...: Inductor settings for the whole process (probes of what the profile points at,
scripts/bench_speed_suite.sh), applied before anything compiles and recorded with the other arguments.
A compiled step's cache key includes them, so a probe never reuses the default's compiled code.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # runs from a bare checkout, no install needed

import transformers  # noqa: E402
from torch._inductor import config as inductor_config  # noqa: E402

from bench_engines import build_model, guarded  # noqa: E402  (same folder: one model builder)
from engine_spec import engine_list, engine_options  # noqa: E402  (same folder: one engine syntax)
from streamkv import engines, timing  # noqa: E402
from streamkv.metrics import perplexity  # noqa: E402
from streamkv.policies import PolicySpec, build_schedule  # noqa: E402

GPU_DEFAULTS = dict(cap=2048, steps=512, lazy_r=64, dtype="float16", engines="fast,decode")
TINY_DEFAULTS = dict(cap=256, steps=256, lazy_r=16, dtype="float32", engines="fast,decode")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="demo-size model on the CPU")
    p.add_argument("--cap", type=int)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--lazy-r", type=int)
    p.add_argument("--steps", type=int, help="decoded tokens per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--stability-runs", type=int, default=2, help="protocol runs of the first engine")
    p.add_argument("--engines", help="comma-separated, each with its options, e.g. fast,fast:linear=torch,"
                   "decode_attention=flash; the first is the one checked for stability ('' for none)")
    p.add_argument("--recompute-batches", default="", help="comma-separated recompute batch sizes ('' skips it)")
    p.add_argument("--recompute-compile", action="store_true", help="each recompute batch size also compiled "
                   "(variants batch{B}_compiled)")
    p.add_argument("--dtype")
    p.add_argument("--config", type=Path, help="a config.json of another architecture (random weights), e.g. "
                   "scripts/configs/llama-3.2-3b-shape.json; default Pythia-2.8B")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (recorded)")
    p.add_argument("--inductor", default="", help="comma-separated torch._inductor.config settings for this "
                   "process, e.g. coordinate_descent_tuning=1,max_autotune=0 (probes)")
    p.add_argument("--anchor", type=Path, help="hf_anchor.py's JSON from the same call")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    for key, value in (TINY_DEFAULTS if args.tiny else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.recompute_batches = [int(b) for b in args.recompute_batches.split(",") if b]
    try:
        args.engines = engine_list(args.engines)
        args.inductor = inductor_settings(args.inductor)
    except ValueError as exc:
        p.error(str(exc))
    args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    return args


def inductor_settings(text: str) -> dict:
    """'key=value,...' as Inductor config values: each key must exist, each value is an integer (a 0/1
    switch for a boolean setting)."""
    settings = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if not hasattr(inductor_config, key) or not value.lstrip("-").isdigit():
            raise ValueError(f"--inductor {item!r}: want an existing torch._inductor.config key = an integer")
        current = getattr(inductor_config, key)
        settings[key] = bool(int(value)) if isinstance(current, bool) else int(value)
    return settings


def variants(args) -> dict[str, PolicySpec]:
    window = args.cap - args.sink
    return {"dense": PolicySpec(n_sink=args.sink, window=window, compress_every=0),
            "strict": PolicySpec(n_sink=args.sink, window=window, compress_every=1),
            f"lazy{args.lazy_r}": PolicySpec(n_sink=args.sink, window=window, compress_every=args.lazy_r)}


def engine_call(name: str):
    """The engine's evaluate function with the options `name` gives it (engine_options)."""
    engine, kwargs = engine_options(name)
    evaluate = engines.get(engine).function
    return lambda *a, **kw: evaluate(*a, **kw, **kwargs)


def protocol(args, engine: str, model, ids) -> tuple[dict, dict]:
    """One run of the protocol for one engine: ({variant: TPOT/TTFT summaries}, {variant: NLL of the last run})."""
    evaluate = engine_call(engine)
    schedules = {name: build_schedule(policy, ids.numel()) for name, policy in variants(args).items()}
    jobs = {name: (lambda s=s: evaluate(model, ids, s, position_mode="cache")) for name, s in schedules.items()}
    runs = timing.interleaved(jobs, warmup=args.warmup, repeats=args.repeats,
                              progress=lambda label, k: print(f"[{engine}] round {k + 1} {label}", file=sys.stderr,
                                                              flush=True))
    rows = {name: {"tpot_ms": timing.summary(r.tpot_ms for r in results),
                   "ttft_ms": timing.summary(r.ttft_ms for r in results),
                   "peak_memory_mb": results[-1].peak_memory_mb}
            for name, results in runs.items()}
    dense = rows["dense"]["tpot_ms"]["median"]
    for row in rows.values():
        row["eviction_overhead"] = row["tpot_ms"]["median"] / dense
    return rows, {name: results[-1].nll for name, results in runs.items()}


def recompute_protocol(args, model, ids) -> dict:
    """The recompute baseline at each batch size of --recompute-batches, interleaved (module doc)."""
    evaluate = engines.get("recompute").function
    modes = {"": False, "_compiled": True} if args.recompute_compile else {"": False}
    jobs = {f"batch{b}{suffix}": (lambda b=b, c=c: evaluate(model, ids, args.cap, batch=b, compile=c))
            for b in args.recompute_batches for suffix, c in modes.items()}
    runs = timing.interleaved(jobs, warmup=args.warmup, repeats=args.repeats,
                              progress=lambda label, k: print(f"[recompute] round {k + 1} {label}", file=sys.stderr,
                                                              flush=True))
    first = runs[next(iter(jobs))][-1].nll
    return {name: {"tpot_ms": timing.summary(r.tpot_ms for r in results),
                   "peak_memory_mb": results[-1].peak_memory_mb,
                   "agreement_with_first": agreement(results[-1].nll, first)}
            for name, results in runs.items()}


def agreement(fast_nll: torch.Tensor, decode_nll: torch.Tensor) -> dict:
    diff = (fast_nll.double() - decode_nll.double()).abs()
    ppl_f, ppl_d = perplexity(fast_nll)[0], perplexity(decode_nll)[0]
    return {"tokens": diff.numel(), "max_abs_nll_diff": diff.max().item(), "mean_abs_nll_diff": diff.mean().item(),
            "ppl_rel_diff": abs(ppl_f - ppl_d) / ppl_d}


def floor_ms(model, cap: int, copy_tbps: float) -> float:
    """The anchor's floor for this model and cap: every parameter and a full `cap`-token K/V cache read once
    per step at the anchor's copy bandwidth (equal to the anchor's own floor for Pythia-2.8B at cap 2048)."""
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = 2 * cfg.num_hidden_layers * cap * kv_heads * head_dim * next(model.parameters()).element_size()
    return (weights + kv) / (copy_tbps * 1e12) * 1e3


def ratios(summary: dict, anchor: dict) -> dict:
    out = {}
    recompute = summary.get("recompute", {})
    if "recompute_ms" in anchor and "error" not in recompute:
        for name, row in recompute.items():
            out[f"hf_recompute_ms_over_recompute_{name}"] = anchor["recompute_ms"] / row["tpot_ms"]["median"]
    for engine, run in summary["engines"].items():
        for name, row in (run["runs"][0] if run["runs"] else {}).items():
            tpot = row["tpot_ms"]["median"]
            out[f"{engine}_{name}_over_floor"] = tpot / summary["floor_ms"]
            for hf in ("hf_dense_ms", "hf_strict_ms", "hf_lazy64_ms"):
                out[f"{hf}_over_{engine}_{name}"] = anchor[hf] / tpot
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for key, value in args.inductor.items():   # before anything compiles
        setattr(inductor_config, key, value)
    summary = {"device": torch.cuda.get_device_name() if args.device == "cuda" else
               f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
               "torch": torch.__version__, "transformers": transformers.__version__,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "engines": {}}
    model = build_model(argparse.Namespace(tiny=args.tiny, device=args.device, dtype=args.dtype, config=args.config))
    n = args.cap + args.steps + 1
    ids = torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
    nll = {}
    if args.anchor and args.anchor.is_file():
        summary["anchor"] = json.loads(args.anchor.read_text())
        summary["floor_ms"] = floor_ms(model, args.cap, summary["anchor"]["copy_TBps"])

    def write() -> None:
        """The summary so far, ratios included: a run cut by a device call's deadline keeps what it measured."""
        if "anchor" in summary:
            summary["ratios"] = ratios(summary, summary["anchor"])
        if args.out:
            args.out.write_text(json.dumps(summary, indent=1) + "\n")

    for k, engine in enumerate(args.engines):
        record = summary["engines"][engine] = {"runs": []}
        for _ in range(args.stability_runs if k == 0 else 1):
            holder = {}
            guarded(holder, "run", lambda: protocol(args, engine, model, ids))
            if isinstance(holder["run"], dict):   # the error record of a failed section
                record["error"] = holder["run"]["error"]
                break
            rows, nll[engine] = holder["run"]
            record["runs"].append(rows)
            write()
        runs = record["runs"]
        if k > 0 and {args.engines[0], engine} <= nll.keys():   # an engine option must not change the numbers
            record["agreement_with_first"] = {name: agreement(nll[engine][name], nll[args.engines[0]][name])
                                              for name in nll[engine]}
        if len(runs) > 1:
            record["run_to_run_rel_diff"] = {
                name: abs(runs[1][name]["tpot_ms"]["median"] / runs[0][name]["tpot_ms"]["median"] - 1)
                for name in runs[0]}
    if args.recompute_batches:
        guarded(summary, "recompute", lambda: recompute_protocol(args, model, ids))
        write()
    first = args.engines[0] if args.engines else None
    if first not in (None, "decode") and {first, "decode"} <= nll.keys():
        summary[f"agreement_{first}_vs_decode"] = {name: agreement(nll[first][name], nll["decode"][name])
                                                   for name in nll[first] if name != "dense"}
    write()
    print(json.dumps({k: v for k, v in summary.items() if k != "anchor"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
