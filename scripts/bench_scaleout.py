"""Wall time of a stage's points on 1 worker vs several: the R sweep with its recompute baseline, random
weights, seeded random token ids (no assets needed), through the same executors `--workers/--gpus` use.

GPU (the issue's measurement; paper profile: Pythia-2.8B architecture, fp16, cap 2048, 20k tokens):
    python3 scripts/bench_scaleout.py --gpus 0 --workers 1 2 --out bench_scaleout.json
    python3 scripts/bench_scaleout.py --gpus 0,1 --workers 1 2 --out bench_scaleout.json   # two GPUs
CPU check at demo size:
    python3 scripts/bench_scaleout.py --profile demo --max-tokens 1000 --workers 1 2

Each worker count runs in a fresh results directory (nothing reused); with --gpus, workers are started by
submitit's LocalExecutor for every count (so the one-worker row pays the same start-up; without --gpus one
worker runs in this process, as `streamkv` does); wall time includes each
worker's model load. Each row also keeps every point's TPOT and how many workers shared its GPU, so the
cost of sharing one GPU shows beside the wall time. The JSON is rewritten after every row, so an
interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # runs from a bare checkout, no install needed

from tqdm import tqdm  # noqa: E402

from streamkv import assets, context, executors, fingerprint, plans, profiles, worker  # noqa: E402
from streamkv.settings import Settings  # noqa: E402
from streamkv.store import Store  # noqa: E402


def units(results: Path, profile_name: str, max_tokens: int | None, split: int) -> list[worker.Unit]:
    settings = Settings(profile=profile_name, results_dir=str(results))
    profile = profiles.resolve(settings)
    model = dataclasses.replace(profile.model, random_weights=True)
    synthetic = profile.dataset(profiles.SYNTHETIC, vocab_size=assets.load_config(model).vocab_size)
    if max_tokens:
        synthetic = dataclasses.replace(synthetic, max_tokens=max_tokens)
    profile = dataclasses.replace(profile, long=synthetic, short=synthetic)
    ctx = context.context(settings, tokenize=True, random_weights=True, profile=profile)
    return worker.units_of([worker.Unit(p.slot, p.spec) for p in plans.plan(ctx, ["sweeps"])], split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: the profile's long dataset")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gpus", default=None, help="all | 0 | 0,1 (unset: CPU workers)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    report = {"profile": args.profile, "gpus": args.gpus, "fingerprint": fingerprint.collect(), "rows": []}
    for count in args.workers:
        with tempfile.TemporaryDirectory(prefix="bench_scaleout.") as tmp:
            results = Path(tmp)
            work = units(results, args.profile, args.max_tokens, count)
            slots = sorted({u.slot for u in work})
            opts = executors.Options(workers=count, gpus=executors.parse_gpus(args.gpus) or None)
            # One CPU worker runs in this process, as a stage runs it; otherwise submitted workers.
            chosen = executors.InProcess(Settings()) if opts.in_process else executors.Workers(opts)
            began = time.perf_counter()
            with tqdm(total=len(slots), desc=f"{count} worker(s)", unit="point", file=sys.stderr) as bar:
                chosen.run(Store(results), work, bar)
            wall = time.perf_counter() - began
            store = Store(results)
            docs = {s: store.read(store.path(s)) for s in slots}
            row = {"workers": count, "points": len(slots), "units": len(work), "wall_s": wall,
                   "perplexity": {s: d["metrics"]["perplexity"] for s, d in docs.items()},
                   # What sharing a GPU does to the timings the tables print (schema.Metrics.device_shared_by).
                   "tpot_ms": {s: d["metrics"]["tpot_ms"] for s, d in docs.items()},
                   "device_shared_by": {s: d["metrics"]["device_shared_by"] for s, d in docs.items()},
                   "config_hash": {s: d["config_hash"] for s, d in docs.items()}}
        report["rows"].append(row)
        print(f"{count} worker(s): {len(slots)} points ({len(work)} units) in {wall:.1f} s", file=sys.stderr)
        if args.out:
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    first = report["rows"][0]
    for row in report["rows"][1:]:
        same = row["config_hash"] == first["config_hash"] and row["perplexity"] == first["perplexity"]
        print(f"{row['workers']} workers vs {first['workers']}: {first['wall_s'] / row['wall_s']:.2f}x faster, "
              f"results {'identical' if same else 'DIFFER'}", file=sys.stderr)


if __name__ == "__main__":
    main()
