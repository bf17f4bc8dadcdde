"""The `tiny` fixture: the real runner and engines on a tiny random GPT-NeoX (test_runner, test_shards)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from streamkv import assets, fingerprint
from streamkv.policies import PolicySpec
from streamkv.runspec import RunSpec
from streamkv.spec import DataSpec, MeasureSpec, ModelSpec
from streamkv.store import Store

from tiny_models import tiny_gpt_neox, token_stream


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """The real runner and engines on a tiny random GPT-NeoX: (store, spec factory); 48-token stream."""
    ids = token_stream(48)
    data = DataSpec(name="long", path="x.json", sha256="f" * 64, n_tokens=48)
    monkeypatch.setattr(assets, "load_model", lambda spec, device: tiny_gpt_neox(dtype=torch.float32))
    monkeypatch.setattr(assets, "load_tokenizer", lambda spec: object())
    monkeypatch.setattr(assets, "load_stream",
                        lambda name, path, tok, n: (ids[:n], dataclasses.replace(data, n_tokens=n)))
    monkeypatch.setattr(fingerprint, "collect", lambda: {"torch": torch.__version__})

    def spec(**kw):
        knobs = dict(model=ModelSpec("tiny", "0" * 40, "float32"), data=data, mode="streaming",
                     policy=PolicySpec(n_sink=2, window=14, compress_every=4), measure=MeasureSpec(repeat_runs=2))
        return RunSpec(**{**knobs, **kw})

    return Store(tmp_path / "results"), spec
