"""The embedded demo model: its training script reruns deterministically, and the committed checkpoint
loads with no network and still scores what its training record says."""
import hashlib
import importlib.util
import json
import math
import re
import socket

import pytest
import torch

from streamkv import assets
import bounds

SCRIPT = assets.REPO / "scripts" / "train_demo_model.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def no_network(monkeypatch):
    """HF offline mode, and any socket connection fails loudly (the env var alone is read at import time)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_training_reruns_deterministically_and_learns(tmp_path):
    script = _script()
    # Small batch and a short warm-up so a handful of steps is fast yet moves the loss; one thread, because
    # two threads on a busy machine make OpenMP spin-wait and this test run ten times slower.
    argv = ["--steps", "6", "--batch-size", "4", "--warmup-steps", "1", "--lr", "3e-3", "--threads", "1"]
    runs = [script.main(argv + ["--out", str(tmp_path / name)]) for name in ("a", "b")]

    losses = runs[0]["losses"]
    assert len(losses) == 6 and losses == runs[1]["losses"]
    assert losses[-1] < losses[0] - 0.3, losses
    files = ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
             "streams/demo-long.json", "streams/demo-short.json"]  # the card and record also hold wall times
    for name in files:
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name), f"{name} differs between equal runs"
    assert runs[0]["sha256"] == _sha(tmp_path / "a" / "model.safetensors")

    record = json.loads((tmp_path / "a" / "train_config.json").read_text())
    assert record["steps"] == 6 and record["weights"]["sha256"] == runs[0]["sha256"]
    assert record["split"]["train_chars"] + record["split"]["heldout_chars"] <= record["corpus"]["n_chars"]
    streams = {n: json.loads((tmp_path / "a" / "streams" / f"{n}.json").read_text())
               for n in ("demo-long", "demo-short")}
    assert streams["demo-long"]["n_tokens_demo_tokenizer"] >= 4096
    assert streams["demo-short"]["n_tokens_demo_tokenizer"] >= 1024


def test_heldout_text_is_never_trained_on():
    script = _script()
    train, heldout, excluded = script.split_topics(script.load_topics(), 0.10)
    train_text = script.join(train)
    heldout_keys = {k for k, _ in heldout}
    assert heldout_keys and not heldout_keys & {k for k, _ in train}
    for _, text in heldout:
        for paragraph in text.split("\n\n"):
            if len(paragraph.strip()) >= script.DUPLICATE_PARAGRAPH_CHARS:
                assert paragraph.strip() not in train_text


def test_committed_streams_are_the_heldout_text():
    script = _script()
    topics = script.load_topics()
    record = json.loads((assets.DEMO_DIR / "train_config.json").read_text())
    if script.sha256_bytes(script.join(topics).encode()) != record["corpus"]["sha256"]:
        pytest.skip(f"this Python's pydoc topics differ from the corpus of Python {record['versions']['python']}")
    train, heldout, _ = script.split_topics(topics, 0.10)
    assert [k for k, _ in heldout] == record["split"]["heldout_topics"]
    long_text = json.loads((assets.DEMO_DIR / "streams" / "demo-long.json").read_text())["text"]
    short_text = json.loads((assets.DEMO_DIR / "streams" / "demo-short.json").read_text())["text"]
    assert long_text + short_text == script.join(heldout)  # disjoint, and nothing else
    assert long_text[-200:] not in script.join(train) and short_text[:200] not in script.join(train)


def test_committed_checkpoint_offline_matches_its_record(no_network):
    record = json.loads((assets.DEMO_DIR / "train_config.json").read_text())
    card = (assets.DEMO_DIR / "MODEL_CARD.md").read_text()
    weights = assets.DEMO_DIR / "model.safetensors"
    sha = _sha(weights)
    assert weights.stat().st_size <= 12 * 1024 * 1024
    assert record["weights"]["sha256"] == sha and sha in card

    spec = assets.demo_model_spec()
    assert spec.revision == sha and spec.name == "data/demo"
    model = assets.load_model(spec, "cpu")
    tokenizer = assets.load_tokenizer(spec)
    ids, _ = assets.load_stream("demo-short", assets.DEMO_STREAMS["demo-short"], tokenizer, None)

    # Re-score independently of the training script: non-overlapping windows, first token is context.
    token_nll = []
    with torch.no_grad():
        for window in ids.split(record["ctx"]):
            if len(window) < 2:
                continue
            logp = torch.log_softmax(model(input_ids=window[None]).logits[0, :-1].float(), dim=-1)
            token_nll.append(-logp.gather(1, window[1:, None]).squeeze(1).double())
    token_nll = torch.cat(token_nll)
    n, ppl = token_nll.numel(), math.exp(token_nll.mean().item())
    assert n == record["eval"]["demo-short_n"]
    # The record was scored in fp32 on the training machine, perhaps with other kernels: each side's
    # per-token NLL is within forward_nll(fp32) of exact, so the mean NLL of the two differs by at most twice
    # that, and the PPL by that much relatively (≈ 5e-4 here).
    rel = 2 * bounds.forward_nll(torch.float32, model.config, record["ctx"], token_nll.max().item())
    assert ppl == pytest.approx(record["eval"]["demo-short_ppl"], rel=rel)
    assert ppl < model.config.vocab_size / 10  # it learned something
    # The card prints three decimals: ±0.0005 on top.
    card_ppl = float(re.search(r"demo-short PPL \| ([0-9.]+)", card).group(1))
    assert ppl == pytest.approx(card_ppl, abs=5e-4 + rel * card_ppl)
