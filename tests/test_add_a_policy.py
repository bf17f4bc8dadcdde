"""docs/ARCHITECTURE.md "How to add a policy", exercised: one file (tests/toy_policy.py, loaded as
streamkv.policies.decayed) and one registry line give a policy that plans, hashes, round-trips through a
result, is refused by the engines that cannot realise it, and runs with decode == reference at EXACT."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from bounds import BROKEN, EXACT
from streamkv import code_identity, engines, policies
from streamkv.runspec import RunSpec
from streamkv.spec import DataSpec, MeasureSpec, ModelSpec, SpecError
from tiny_models import MODELS, cached_model, cached_stream

MODULE = "streamkv.policies.decayed"
FILE = Path(__file__).with_name("toy_policy.py")
N_TOKENS = 60


@pytest.fixture
def decayed(monkeypatch):
    """The toy module as if it were streamkv/policies/decayed.py, and its registry line."""
    spec = importlib.util.spec_from_file_location(MODULE, FILE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, MODULE, module)
    spec.loader.exec_module(module)
    path = code_identity._path
    monkeypatch.setattr(code_identity, "_path", lambda name: FILE if name == MODULE else path(name))
    monkeypatch.setitem(policies.REGISTRY, module.Decayed.NAME, module.Decayed)   # the one registry line
    return module.Decayed


def test_it_is_a_point_like_any_other(decayed):
    common = dict(model=ModelSpec("m", "0" * 40), data=DataSpec("d", "d.json", "f" * 64, 100), mode="streaming")
    point = RunSpec(**common, policy=decayed.auto_cap(16, 2, heavy=6, compress_every=4))
    assert point.policy.window == 8 and RunSpec.from_dict(point.to_dict()) == point
    assert point.hashed()["policy"]["name"] == "decayed"
    assert point.code_identity()["policies"] == code_identity.identity(MODULE)
    assert engines.timing_engine(point) == "decode"
    with pytest.raises(SpecError, match="the fast engine realises schedule policies, not the score-based decayed"):
        RunSpec(**common, policy=point.policy, engine="fast")


@pytest.mark.parametrize("mode", ["cache", "absolute"])
@pytest.mark.parametrize("rate", [1, 8])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_decode_matches_reference(decayed, model_name, rate, mode):
    schedule = policies.build_schedule(decayed(n_sink=2, window=4, heavy=6, compress_every=rate), N_TOKENS)
    ref, dec = (engines.get(e).function(cached_model(model_name), cached_stream(N_TOKENS), schedule,
                                        position_mode=mode, loss_dtype="float64") for e in ("reference", "decode"))
    assert ref.cache_len_after_step == dec.cache_len_after_step == schedule.cache_len_after_step
    assert (dec.nll - ref.nll).abs().max().item() <= EXACT
    # It is its own policy: it keeps other tokens than H2O, which never forgets.
    h2o = policies.build_schedule(policies.H2O(n_sink=2, window=4, heavy=6, compress_every=rate), N_TOKENS)
    other = engines.get("decode").function(cached_model(model_name), cached_stream(N_TOKENS), h2o,
                                           position_mode=mode, loss_dtype="float64")
    assert (other.nll - dec.nll).abs().max().item() > BROKEN


def test_a_score_grouped_by_call_instead_of_by_query_breaks_the_equality(decayed, monkeypatch):
    """Why the toy decays per query: the same rule per call (the prefill's queries at once in decode, one
    by one in the reference) gives two engines two policies."""
    monkeypatch.setattr(decayed, "score", lambda self, carried, attention: carried * 0.5 + attention.sum(0))
    # Strict R = 1: the first prune follows the prefill by one token, while the prefill's queries still weigh.
    schedule = policies.build_schedule(decayed(n_sink=2, window=4, heavy=6, compress_every=1), N_TOKENS)
    ref, dec = (engines.get(e).function(cached_model("gpt_neox"), cached_stream(N_TOKENS), schedule,
                                        loss_dtype="float64") for e in ("reference", "decode"))
    assert (dec.nll - ref.nll).abs().max().item() > BROKEN
