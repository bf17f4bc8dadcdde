"""Time the decode engine on the Pythia-2.8B architecture with random fp16 weights (speed only).

    python scripts/bench_decode.py --out bench.json                  # on the GPU machine, cap 2048
    python scripts/bench_decode.py --tiny                            # a shrunken model, runs on CPU

Run it in the same call as ../shared/bench/hf_anchor.py so both share one card. Every variant runs one
untimed warm-up pass (it pays for cuDNN/SDPA plans per key length and allocator growth), then --repeats
timed passes over the same shapes, reported as mean and population std (HF decode at this size is bound
by host-side Python, so passes vary with the host's load). Each pass prefills `cap` tokens, then decodes
`--steps` tokens, one per forward, computing every token's loss as a real evaluation does.
Figures, ms per decoded token:
  decode_full_ms             no eviction, cache growing from cap (compare hf_dense_ms)
  decode_strict_ms           Start+Recent, S=--sink, R=1, exact re-rotation in cache mode (hf_strict_ms)
  decode_strict_absolute_ms  the same schedule in absolute mode: no re-rotation, so the difference to
                             decode_strict_ms is what exact re-rotation costs
  decode_lazy{R}_ms          lazy pruning, R=--lazy-every (hf_lazy64_ms for R=64)
plus ttft_*_ms (the prefill step) and peak_memory_mb_* per phase on CUDA.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from streamkv.engines import decode
from streamkv.policies import build_schedule
from streamkv.spec import PolicySpec

PYTHIA_CONFIG = Path(__file__).resolve().parents[1] / "streamkv" / "configs" / "pythia-2.8b.json"


def pythia_config() -> tuple[GPTNeoXConfig, str]:
    return GPTNeoXConfig.from_json_file(str(PYTHIA_CONFIG)), str(PYTHIA_CONFIG.name)


def tiny_config() -> tuple[GPTNeoXConfig, str]:
    """Pythia's shape rules (80-dim heads... shrunk to 32, 25% rotary, parallel residual) at toy size."""
    return GPTNeoXConfig(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=512, rotary_pct=0.25, max_position_embeddings=2048,
                         use_parallel_residual=True, tie_word_embeddings=False), "tiny"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="decode steps after the prefill (256; tiny: 64)")
    p.add_argument("--cap", type=int, default=None, help="CAP_TOTAL (2048; tiny: 64)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--lazy-every", type=int, default=64, help="R of the lazy variant")
    p.add_argument("--repeats", type=int, default=3, help="timed passes after the warm-up (mean ± std)")
    p.add_argument("--tiny", action="store_true", help="a shrunken config (CPU check of the script)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args()
    if not a.tiny and a.device != "cuda":
        p.error("the full-size benchmark needs CUDA; use --tiny to check the script on CPU")
    steps = a.steps or (64 if a.tiny else 256)
    cap = a.cap or (64 if a.tiny else 2048)
    config, source = tiny_config() if a.tiny else pythia_config()
    dtype = torch.float16 if a.device == "cuda" else torch.float32   # CPU fp16 matmuls are emulated, slow

    torch.manual_seed(0)
    with torch.device(a.device):
        model = GPTNeoXForCausalLM(config).to(dtype).eval()
    n_tokens = cap + steps + 1   # prefill `cap`, then `steps` single-token steps; the last token is not fed
    ids = torch.randint(0, config.vocab_size, (n_tokens,), device=a.device)
    variants = {
        "full": (PolicySpec.auto_cap(cap, a.sink, compress_every=0), "cache"),
        "strict": (PolicySpec.auto_cap(cap, a.sink, compress_every=1), "cache"),
        "strict_absolute": (PolicySpec.auto_cap(cap, a.sink, compress_every=1), "absolute"),
        f"lazy{a.lazy_every}": (PolicySpec.auto_cap(cap, a.sink, compress_every=a.lazy_every), "cache"),
    }
    out = {"device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "config": source, "dtype": str(dtype).removeprefix("torch."),
           "cap": cap, "steps": steps, "sink": a.sink}
    for name, (policy, mode) in variants.items():
        schedule = build_schedule(policy, n_tokens)
        decode.evaluate(model, ids, schedule, position_mode=mode)   # warm-up pass
        runs = [decode.evaluate(model, ids, schedule, position_mode=mode) for _ in range(a.repeats)]
        tpot = torch.tensor([r.tpot_ms for r in runs], dtype=torch.float64)
        out[f"decode_{name}_ms"] = round(tpot.mean().item(), 3)
        out[f"decode_{name}_ms_std"] = round(tpot.std(correction=0).item(), 3)
        out[f"ttft_{name}_ms"] = round(sum(r.ttft_ms for r in runs) / a.repeats, 3)
        out[f"n_prunes_{name}"] = schedule.n_prunes
        if runs[-1].peak_memory_mb is not None:
            out[f"peak_memory_mb_{name}"] = {k: round(v, 1) for k, v in runs[-1].peak_memory_mb.items()}
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
