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
  streams    the held-out text cut once at a line start: demo-short = the text from the cut on
             (>= --short-tokens tokens, as few as possible), demo-long = everything before it
             (>= --long-tokens tokens). They are disjoint and both unseen in training.
  eval       PPL over non-overlapping --ctx windows; the first token of each window is context only;
             fp32 log-softmax, fp64 sums. An add-one unigram of the training split is scored on the same
             tokens, as the number a model that ignores context would get.

Run (from the repository root):  .venv/bin/python scripts/train_demo_model.py
A test runs a few steps into a temporary directory with --steps N --out DIR.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import tokenizers
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

REPO = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
# A held-out topic sharing a paragraph at least this long with the training text is not held out.
DUPLICATE_PARAGRAPH_CHARS = 80
GRAD_CLIP = 1.0
BETAS = (0.9, 0.95)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "data" / "demo")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ctx", type=int, default=256, help="training/eval context length (tokens)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout, training only")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--heldout-frac", type=float, default=0.10)
    p.add_argument("--short-tokens", type=int, default=1024)
    p.add_argument("--long-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (float sums depend on it)")
    return p.parse_args(argv)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- corpus
def load_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics
    return sorted(topics.items())


def join(topics: list[tuple[str, str]]) -> str:
    return "\n".join(text for _, text in topics)


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


# ------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def write_tokenizer(tok: Tokenizer, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    # What AutoTokenizer needs to load tokenizer.json offline as a PreTrainedTokenizerFast (4.x and 5.x).
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS, "unk_token": EOS,
              "clean_up_tokenization_spaces": False}
    write_json(out / "tokenizer_config.json", config)


# --------------------------------------------------------------------------------------------- streams
def make_streams(heldout: list[tuple[str, str]], tok: Tokenizer, short_tokens: int, long_tokens: int) -> dict:
    """Cut the held-out text once, at the last line start that leaves >= short_tokens after it:
    demo-long is the text before the cut, demo-short the text from it (disjoint, both unseen)."""
    text = join(heldout)
    cut = text.rfind("\n") + 1
    while cut > 0 and len(tok.encode(text[cut:]).ids) < short_tokens:
        cut = text.rfind("\n", 0, cut - 1) + 1
    spans, offset = [], 0  # each topic's character span in the held-out text
    for key, topic in heldout:
        spans.append((offset, offset + len(topic), key))
        offset += len(topic) + 1
    streams = {}
    for name, (begin, end) in {"demo-long": (0, cut), "demo-short": (cut, len(text))}.items():
        stream_text = text[begin:end]
        streams[name] = {
            "text": stream_text,
            "source": f"pydoc_data.topics (Python {platform.python_version()}), held-out split of "
                      f"scripts/train_demo_model.py, characters [{begin}, {end}) of the held-out text",
            "n_chars": len(stream_text),
            "sha256": sha256_bytes(stream_text.encode("utf-8")),
            "topics": [key for lo, hi, key in spans if lo < end and hi > begin],
            "n_tokens_demo_tokenizer": len(tok.encode(stream_text).ids),
        }
    if streams["demo-short"]["n_tokens_demo_tokenizer"] < short_tokens or \
            streams["demo-long"]["n_tokens_demo_tokenizer"] < long_tokens:
        raise SystemExit(f"held-out split too small for streams of {long_tokens} + {short_tokens} tokens: "
                         "raise --heldout-frac")
    return streams


# ----------------------------------------------------------------------------------------------- model
def model_config(args, vocab_size: int) -> dict:
    """config.json in the hub's Pythia format: transformers 4.x reads it natively, 5.x converts
    rotary_pct/rotary_emb_base into rope_parameters on load. Dropout is 0 here, as in Pythia's config: the
    committed model is for evaluation only, so no code path can apply dropout to it by accident; training
    overrides it with --dropout (recorded in train_config.json)."""
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


@contextlib.contextmanager
def deterministic(seed: int, threads: int):
    """Fixed seed, deterministic kernels and a fixed thread count, restored afterwards (a test calls main()
    inside a pytest process, whose other tests must not inherit these settings)."""
    were_deterministic, old_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(were_deterministic)
            torch.set_num_threads(old_threads)


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, ids: torch.Tensor, args) -> list[float]:
    """Batches of random ctx-token windows of the training stream, drawn from a generator seeded by --seed."""
    generator = torch.Generator().manual_seed(args.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and LayerNorms
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=BETAS)
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
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {lr_at(step, args):.2e}", flush=True)
    model.eval()
    return losses


def scored_windows(ids: torch.Tensor, ctx: int) -> list[torch.Tensor]:
    """Non-overlapping ctx-token windows; each scores its tokens 1.. from the ones before (one-token
    windows score nothing and are dropped)."""
    return [w for w in ids.split(ctx) if len(w) >= 2]


def perplexity(model, ids: torch.Tensor, ctx: int) -> tuple[float, int]:
    nll_sum, n = 0.0, 0
    with torch.no_grad():
        for window in scored_windows(ids, ctx):
            logp = torch.log_softmax(model(input_ids=window[None]).logits[0, :-1].float(), dim=-1)
            nll_sum += -logp.gather(1, window[1:, None]).double().sum().item()
            n += len(window) - 1
    return math.exp(nll_sum / n), n


def unigram_perplexity(train_ids: torch.Tensor, ids: torch.Tensor, vocab_size: int, ctx: int) -> float:
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    targets = torch.cat([w[1:] for w in scored_windows(ids, ctx)])
    return math.exp(-logp[targets].sum().item() / len(targets))


def save_weights(model, path: Path) -> None:
    """Save in the hub's Pythia key layout (`embed_out.*`): 4.x loads it as is, 5.x renames it to `lm_head`."""
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("lm_head."):
            key = "embed_out." + key[len("lm_head."):]
        state[key] = tensor.detach().contiguous().clone()
    save_file(state, str(path), metadata={"format": "pt"})


def model_card(cfg: dict, record: dict) -> str:
    ev, split, weights = record["eval"], record["split"], record["weights"]
    return f"""# streamkv demo model

A tiny GPT-NeoX (Pythia's architecture: partial rotary with rotary_pct 0.25, parallel residual, untied
output head) trained from scratch by `scripts/train_demo_model.py`, so that the `demo` profile runs on a CPU
without downloads. It is a test article for KV-cache eviction experiments, not a useful language model.

| | |
|---|---|
| Corpus | `pydoc_data.topics` of Python {record['versions']['python']}, sorted by key, joined with newlines: {record['corpus']['n_chars']} characters, sha256 `{record['corpus']['sha256']}` |
| Training split | topics `{split['train_topics'][0]}` .. `{split['train_topics'][-1]}`: {split['train_tokens']} tokens |
| Held-out split | {', '.join(split['heldout_topics'])}: {split['heldout_tokens']} tokens, never trained on |
| Excluded | {', '.join(split['excluded_topics']) or 'none'} (their paragraphs also appear in training topics) |
| Tokenizer | byte-level BPE, vocab {cfg['vocab_size']}, trained with `tokenizers` on the training split only |
| Model | {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} heads, context {cfg['max_position_embeddings']}, {record['n_parameters']} parameters |
| Training | {record['steps']} steps of {record['batch_size']} x {record['ctx']} tokens, AdamW lr {record['lr']} (warm-up {record['warmup_steps']}, cosine to 10%), weight decay {record['weight_decay']}, dropout {record['dropout']}, seed {record['seed']}, {record['threads']} CPU threads, {record['train_wall_s']} s |
| Final training loss | {record['final_loss']:.4f} |
| **Held-out PPL** | **{ev['heldout_ppl']:.3f}** over {ev['heldout_n']} predicted tokens (add-one unigram of the training split: {ev['heldout_unigram_ppl']:.1f}) |
| demo-short PPL | {ev['demo-short_ppl']:.3f} over {ev['demo-short_n']} predicted tokens |
| demo-long PPL | {ev['demo-long_ppl']:.3f} over {ev['demo-long_n']} predicted tokens |
| `model.safetensors` | {weights['bytes']} bytes, float32, sha256 `{weights['sha256']}` |

PPL: {ev['method']}. The same numbers, the full split and all settings are in `train_config.json`; the
streams (`streams/demo-long.json`, `streams/demo-short.json`) carry their held-out topics and character span.

Weights are stored in float32, the dtype they were trained and evaluated in, so the PPL above belongs to
these exact bytes (fp16 would add a rounding step for a CPU model that computes in fp32 or fp64 anyway);
{weights['bytes'] / 1e6:.1f} MB is well under the 12 MB budget. Keys use the hub's Pythia layout
(`embed_out`), which transformers 4.x loads as is and 5.x renames to `lm_head`.

Rebuild: `.venv/bin/python scripts/train_demo_model.py`. The same Python, torch, thread count and CPU kind
give the same bytes; another Python version ships different help texts, hence a different corpus.
"""


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with deterministic(args.seed, args.threads):
        return _run(args, sys.argv[1:] if argv is None else list(argv))


def _run(args, argv: list[str]) -> dict:
    t0 = time.perf_counter()
    topics = load_topics()
    corpus = join(topics)
    train_topics, heldout, excluded = split_topics(topics, args.heldout_frac)
    train_text, heldout_text = join(train_topics), join(heldout)
    tok = train_tokenizer(train_text, args.vocab_size)
    streams = make_streams(heldout, tok, args.short_tokens, args.long_tokens)

    cfg = model_config(args, tok.get_vocab_size())
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**{**cfg, "hidden_dropout": args.dropout,
                                                   "attention_dropout": args.dropout}))
    train_ids = torch.tensor(tok.encode(train_text).ids)
    heldout_ids = torch.tensor(tok.encode(heldout_text).ids)
    losses = train(model, train_ids, args)
    train_wall_s = round(time.perf_counter() - t0, 1)

    ev = {"method": f"non-overlapping {args.ctx}-token windows, the first token of each is context only, "
                    "fp32 log-softmax, fp64 sum"}
    ev["heldout_ppl"], ev["heldout_n"] = perplexity(model, heldout_ids, args.ctx)
    ev["heldout_unigram_ppl"] = unigram_perplexity(train_ids, heldout_ids, cfg["vocab_size"], args.ctx)
    for name, stream in streams.items():
        ev[f"{name}_ppl"], ev[f"{name}_n"] = perplexity(model, torch.tensor(tok.encode(stream["text"]).ids), args.ctx)
    print(f"held-out PPL {ev['heldout_ppl']:.3f} (unigram {ev['heldout_unigram_ppl']:.1f})  demo-short "
          f"{ev['demo-short_ppl']:.3f}  demo-long {ev['demo-long_ppl']:.3f}  ({train_wall_s} s to train)", flush=True)

    out = args.out
    (out / "streams").mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "model.safetensors")
    write_json(out / "config.json", cfg)
    write_tokenizer(tok, out)
    for name, stream in streams.items():
        write_json(out / "streams" / f"{name}.json", stream)
    weights = out / "model.safetensors"
    record = {
        "script": "scripts/train_demo_model.py",
        "argv": argv,
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
        "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay, "dropout": args.dropout,
        "optimizer": f"AdamW{BETAS}", "grad_clip": GRAD_CLIP, "threads": args.threads,
        "deterministic_algorithms": True,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": losses[-1], "train_wall_s": train_wall_s, "eval": ev,
        # streamkv.assets.demo_model_spec() pins this sha256 as the demo ModelSpec's revision.
        "weights": {"file": weights.name, "dtype": "float32", "bytes": weights.stat().st_size,
                    "sha256": sha256_bytes(weights.read_bytes())},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
    }
    write_json(out / "train_config.json", record)
    (out / "MODEL_CARD.md").write_text(model_card(cfg, record), encoding="utf-8")
    print(f"wrote {out}: {weights.name} {record['weights']['bytes']} bytes, sha256 {record['weights']['sha256']}")
    return {"losses": losses, "eval": ev, "sha256": record["weights"]["sha256"]}


if __name__ == "__main__":
    main()
