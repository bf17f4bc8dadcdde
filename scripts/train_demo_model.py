"""Train the embedded demo model: a tiny GPT-NeoX (Pythia's architecture) on Python's own documentation.

Everything is derived deterministically from text that ships with Python, so the committed checkpoint in
data/demo/ can be rebuilt and audited without any download:

  corpus     pydoc_data.topics values, sorted by key, joined with "\\n" (each topic already ends with one)
  split      held-out = the shortest run of *last* topics (sorted order) that holds >= --heldout-frac of the
             characters; the training split is everything before it, so it is a prefix of the corpus.
             Held-out topics that repeat a long paragraph of the training text verbatim (e.g. "while", whose
             text is also part of "compound") are excluded from both splits: held-out text is never seen.
  tokenizer  byte-level BPE trained with `tokenizers` on the training split only
  model      GPTNeoXForCausalLM with partial rotary (rotary_pct 0.25) and parallel residual, like Pythia
  streams    demo-short = the last held-out topics (>= --short-tokens tokens); demo-long = the other held-out
             topics (>= --long-tokens tokens). They are disjoint and both unseen in training.
  eval       PPL over non-overlapping --ctx windows; the first token of each window is context only;
             fp32 log-softmax, fp64 sums.

Run (from the repository root):  .venv/bin/python scripts/train_demo_model.py
A test runs a few steps into a temporary directory with --steps N --out DIR.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
# A held-out topic sharing a paragraph at least this long with the training text is not held out.
DUPLICATE_PARAGRAPH_CHARS = 80


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "data" / "demo")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ctx", type=int, default=256, help="training/eval context length (tokens)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--heldout-frac", type=float, default=0.10)
    p.add_argument("--short-tokens", type=int, default=1024)
    p.add_argument("--long-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (results depend on it)")
    return p.parse_args(argv)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_bytes(path.read_bytes())


# ---------------------------------------------------------------------------------------------- corpus
def load_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics
    return sorted(topics.items())


def split_topics(topics: list[tuple[str, str]], heldout_frac: float):
    """Return (train, heldout, excluded) lists of (key, text); train is a prefix of the sorted topics."""
    total = sum(len(text) for _, text in topics)
    cut, tail_chars = len(topics), 0
    while tail_chars < heldout_frac * total:
        cut -= 1
        tail_chars += len(topics[cut][1])
    train = topics[:cut]
    train_text = join(train)
    heldout, excluded = [], []
    for key, text in topics[cut:]:
        long_paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) >= DUPLICATE_PARAGRAPH_CHARS]
        (excluded if any(p in train_text for p in long_paragraphs) else heldout).append((key, text))
    return train, heldout, excluded


def join(topics: list[tuple[str, str]]) -> str:
    return "\n".join(text for _, text in topics)


# ------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def write_tokenizer(tok, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    # What AutoTokenizer needs to load tokenizer.json offline as a PreTrainedTokenizerFast (4.x and 5.x).
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS, "unk_token": EOS,
              "clean_up_tokenization_spaces": False}
    write_json(out / "tokenizer_config.json", config)


# --------------------------------------------------------------------------------------------- streams
def make_streams(heldout: list[tuple[str, str]], tok, short_tokens: int, long_tokens: int) -> dict:
    """demo-short: the fewest last held-out topics reaching short_tokens; demo-long: the held-out topics before."""
    def n_tokens(topics):
        return len(tok.encode(join(topics)).ids)

    k = len(heldout) - 1
    while k > 0 and n_tokens(heldout[k:]) < short_tokens:
        k -= 1
    parts = {"demo-long": heldout[:k], "demo-short": heldout[k:]}
    if n_tokens(parts["demo-short"]) < short_tokens or n_tokens(parts["demo-long"]) < long_tokens:
        raise SystemExit(f"held-out split too small for streams of {long_tokens} + {short_tokens} tokens: "
                         "raise --heldout-frac")
    streams = {}
    for name, topics in parts.items():
        text = join(topics)
        streams[name] = {
            "text": text,
            "source": f"pydoc_data.topics (Python {platform.python_version()}), held-out split of "
                      "scripts/train_demo_model.py",
            "n_chars": len(text),
            "sha256": sha256_bytes(text.encode("utf-8")),
            "topics": [key for key, _ in topics],
            "n_tokens_demo_tokenizer": n_tokens(topics),
        }
    return streams


# ----------------------------------------------------------------------------------------------- model
def model_config(args, vocab_size: int) -> dict:
    """config.json in the hub's Pythia format: transformers 4.x reads it natively, 5.x converts
    rotary_pct/rotary_emb_base into rope_parameters on load."""
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": vocab_size,
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "intermediate_size": 4 * args.hidden_size,
        "hidden_act": "gelu",
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "max_position_embeddings": args.ctx,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,
        "use_parallel_residual": True,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, ids, args) -> list[float]:
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # biases and LayerNorms
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    offsets = torch.arange(args.ctx)
    losses = []
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(ids) - args.ctx, (args.batch_size,), generator=generator)
        batch = ids[starts[:, None] + offsets]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {lr_at(step, args):.2e}", flush=True)
    model.eval()
    return losses


def perplexity(model, ids, ctx: int) -> tuple[float, int]:
    """PPL over non-overlapping windows of ctx tokens; each window's first token is context only."""
    import torch

    nll_sum, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, ctx):
            window = ids[start:start + ctx]
            if len(window) < 2:
                break
            logits = model(input_ids=window[None]).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            nll = -logp.gather(1, window[1:, None]).squeeze(1)
            nll_sum += nll.double().sum().item()
            n += len(window) - 1
    return math.exp(nll_sum / n), n


def save_weights(model, path: Path) -> None:
    """Save in the hub's Pythia key layout (`embed_out.*`): 4.x loads it as is, 5.x renames it to `lm_head`."""
    from safetensors.torch import save_file

    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("lm_head."):
            key = "embed_out." + key[len("lm_head."):]
        state[key] = tensor.detach().contiguous().clone()
    save_file(state, str(path), metadata={"format": "pt"})


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def model_card(cfg: dict, train_cfg: dict, weights_sha: str, size: int) -> str:
    ev = train_cfg["eval"]
    return f"""# streamkv demo model

A tiny GPT-NeoX (Pythia's architecture: partial rotary, rotary_pct 0.25; parallel residual) trained from
scratch by `scripts/train_demo_model.py` so that the `demo` profile runs on a laptop CPU without downloads.
It is a test article for KV-cache eviction experiments, not a useful language model.

- Corpus: `pydoc_data.topics` of Python {train_cfg['versions']['python']} (the interactive help texts),
  sorted by key, joined; {train_cfg['corpus']['n_chars']} characters, sha256 `{train_cfg['corpus']['sha256']}`.
- Split: training = topics `{train_cfg['split']['train_topics'][0]}` .. `{train_cfg['split']['train_topics'][-1]}`
  ({train_cfg['split']['train_tokens']} tokens); held-out = {', '.join(train_cfg['split']['heldout_topics'])}
  ({train_cfg['split']['heldout_tokens']} tokens), never trained on; excluded (text repeated in training):
  {', '.join(train_cfg['split']['excluded_topics']) or 'none'}.
- Tokenizer: byte-level BPE, vocab {cfg['vocab_size']}, trained with `tokenizers` on the training split only.
- Model: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} heads,
  context {cfg['max_position_embeddings']}, {train_cfg['n_parameters']} parameters, stored as float32.
- Training: {train_cfg['steps']} steps of {train_cfg['batch_size']} x {train_cfg['ctx']} tokens, AdamW lr
  {train_cfg['lr']} (warm-up {train_cfg['warmup_steps']}, cosine to 10%), seed {train_cfg['seed']},
  {train_cfg['threads']} CPU threads, {train_cfg['wall_s']} s; final training loss {train_cfg['final_loss']:.4f}.
- Held-out perplexity ({ev['method']}): {ev['heldout_ppl']:.3f} over {ev['heldout_n']} predicted tokens;
  demo-short {ev['demo-short_ppl']:.3f} ({ev['demo-short_n']} tokens); demo-long {ev['demo-long_ppl']:.3f}
  ({ev['demo-long_n']} tokens).
- Streams: `streams/demo-long.json`, `streams/demo-short.json` (held-out text, with topic provenance).
- `model.safetensors`: {size} bytes, sha256 `{weights_sha}` (the demo ModelSpec's revision).

Rebuild: `.venv/bin/python scripts/train_demo_model.py` (same Python, torch and thread count give the same
bytes; another Python version ships different help texts and so a different corpus).
"""


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import tokenizers
    import torch
    import transformers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    # Determinism: fixed seeds, deterministic kernels, a fixed thread count (reductions depend on it), and
    # a single-threaded tokenizer trainer.
    os.environ["RAYON_NUM_THREADS"] = "1"
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    topics = load_topics()
    corpus = join(topics)
    train_topics, heldout, excluded = split_topics(topics, args.heldout_frac)
    train_text, heldout_text = join(train_topics), join(heldout)
    tok = train_tokenizer(train_text, args.vocab_size)
    streams = make_streams(heldout, tok, args.short_tokens, args.long_tokens)

    cfg = model_config(args, tok.get_vocab_size())
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**cfg))
    train_ids = torch.tensor(tok.encode(train_text).ids)
    heldout_ids = torch.tensor(tok.encode(heldout_text).ids)
    losses = train(model, train_ids, args)
    wall_s = round(time.perf_counter() - t0, 1)

    ev = {"method": f"non-overlapping {args.ctx}-token windows, first token of each window is context only, "
                    "fp32 log-softmax, fp64 sum"}
    ev["heldout_ppl"], ev["heldout_n"] = perplexity(model, heldout_ids, args.ctx)
    for name, stream in streams.items():
        ev[f"{name}_ppl"], ev[f"{name}_n"] = perplexity(model, torch.tensor(tok.encode(stream["text"]).ids), args.ctx)
    print(f"held-out PPL {ev['heldout_ppl']:.3f}  demo-short {ev['demo-short_ppl']:.3f}  "
          f"demo-long {ev['demo-long_ppl']:.3f}  ({wall_s} s training incl. tokenizer)", flush=True)

    out = args.out
    (out / "streams").mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "model.safetensors")
    write_json(out / "config.json", cfg)
    write_tokenizer(tok, out)
    for name, stream in streams.items():
        write_json(out / "streams" / f"{name}.json", stream)
    train_cfg = {
        "script": "scripts/train_demo_model.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "corpus": {"source": "pydoc_data.topics values sorted by key, joined with '\\n'",
                   "n_chars": len(corpus), "sha256": sha256_bytes(corpus.encode("utf-8"))},
        "split": {"rule": f"held-out = shortest tail of sorted topics with >= {args.heldout_frac} of the characters; "
                          f"tail topics sharing a >= {DUPLICATE_PARAGRAPH_CHARS}-char paragraph with the training "
                          "text are excluded",
                  "train_topics": [k for k, _ in train_topics], "heldout_topics": [k for k, _ in heldout],
                  "excluded_topics": [k for k, _ in excluded],
                  "train_chars": len(train_text), "heldout_chars": len(heldout_text),
                  "train_tokens": len(train_ids), "heldout_tokens": len(heldout_ids)},
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "ctx": args.ctx, "lr": args.lr,
        "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay, "optimizer": "AdamW(0.9, 0.95)",
        "grad_clip": 1.0, "threads": args.threads, "deterministic_algorithms": True,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": losses[-1], "wall_s": wall_s, "eval": ev,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
    }
    write_json(out / "train_config.json", train_cfg)
    weights_sha = sha256_file(out / "model.safetensors")
    size = (out / "model.safetensors").stat().st_size
    (out / "MODEL_CARD.md").write_text(model_card(cfg, train_cfg, weights_sha, size), encoding="utf-8")
    print(f"wrote {out}: model.safetensors {size} bytes, sha256 {weights_sha}")
    return {"losses": losses, "eval": ev, "sha256": weights_sha}


if __name__ == "__main__":
    main()
