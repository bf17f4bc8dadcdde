"""Would torch.compile speed up the recompute baseline? Its decode phase is one call, compat.last_logits on B
windows of C tokens (streamkv/engines/recompute.py); this times that call eager and compiled, per window.

    python3 scripts/probe_recompute_compile.py --batch 32 --out probe.json   # GPU, Pythia-2.8B shape, fp16
    python3 scripts/probe_recompute_compile.py --tiny --batch 4               # CPU, demo model shape

Why a probe before an engine option: eager, a B·C-row forward spends its non-GEMM time in unfused
element-wise kernels (layer norms, rotary, GELU, residual adds: each a full read and write of its
activations); Inductor fuses them. What that is worth on a card decides whether the engine compiles its
forward (a compile per window shape, cached by streamkv/compile_cache.py). Same random fp16 weights and
random windows for both; rounds interleave eager and compiled; reported: the compile's wall time, ms per
window (median of --repeats, ± half the range) and the largest logit difference between the two (fp16
fusions round differently: a noise figure).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # runs from a bare checkout, no install needed

from bench_engines import build_model, timed  # noqa: E402  (same folder: one model builder)
from streamkv import compat, timing  # noqa: E402
from streamkv.engines.recompute import unmasked_attention  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="demo-size model on the CPU")
    p.add_argument("--cap", type=int, help="tokens per window (default 2048; --tiny 64)")
    p.add_argument("--batch", type=int, default=32, help="windows per forward")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (recorded)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.cap = args.cap or (64 if args.tiny else 2048)
    args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    args.dtype = "float32" if args.device == "cpu" else "float16"
    if args.cap < 1 or args.batch < 1 or args.repeats < 1:
        p.error("--cap, --batch and --repeats must be at least 1")
    return args


@torch.inference_mode()
def probe(args) -> dict:
    model = build_model(args)
    windows = torch.randint(model.config.vocab_size, (args.batch, args.cap),
                            generator=torch.Generator().manual_seed(1)).to(args.device)
    calls = {"eager": lambda: compat.last_logits(model, windows),
             "compiled": torch.compile(lambda: compat.last_logits(model, windows), dynamic=False)}
    # Both without a mask (recompute.unmasked_attention): eager the same call as HF's "sdpa", compiled not the
    # causal mask HF's "sdpa" builds when traced.
    with unmasked_attention(model):
        eager_logits, _ = timed(args.device, calls["eager"])             # warm-up: cuBLAS / cuDNN plans
        compiled_logits, compile_s = timed(args.device, calls["compiled"])   # the compile, then one forward
        per_window = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, call in calls.items():
                per_window[name].append(timed(args.device, call)[1] * 1e3 / args.batch)
    rows = {name: timing.summary(ms) for name, ms in per_window.items()}
    return {"ms_per_window": rows, "compile_s": compile_s,
            "eager_over_compiled": rows["eager"]["median"] / rows["compiled"]["median"],
            "max_abs_logit_diff": (eager_logits.float() - compiled_logits.float()).abs().max().item()}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # compile_s is a cold compile only with empty caches: Inductor's and Triton's defaults (/tmp, ~/.triton)
    # would serve a rerun on the same machine from what the last run left there.
    cache = tempfile.TemporaryDirectory(prefix="probe-compile-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.environ["TRITON_CACHE_DIR"] = cache.name
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    record = {"device": device, "torch": torch.__version__, "threads": args.threads,
              "args": {k: str(v) for k, v in vars(args).items()}, **probe(args), "compile_caches": "fresh, empty"}
    cache.cleanup()
    text = json.dumps(record, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
