"""H2O and TOVA under lazy pruning (streamkv/policies/h2o.py, tova.py): the decode engine against the
float64 reference engine, and both against an independent oracle of the keep sets.

The oracle (`oracle`) shares no code with the engines or streamkv/policies/scoring.py: it replays the
policy in absolute positions, where a whole stream is one dense forward under a per-query mask
(test_engines.test_absolute_mode_equals_one_masked_dense_forward), reads the attention probabilities of
that forward at every prune, aggregates them as the policies document (mean over layers and heads), and
picks the kept tokens with Python's sort. Perturbing any of those choices (one layer, one head, the
query before the current one) gives other keep sets and a per-token NLL more than bounds.BROKEN away,
so the equality at bounds.EXACT pins the aggregation and the step the engines take their scores from.
"""
from __future__ import annotations

import functools

import pytest
import torch

from bounds import BROKEN, EXACT
from streamkv import assets, engines
from streamkv.policies import H2O, TOVA, PolicySpec, build_schedule, scoring
from test_engines import assert_decode_equals_reference, max_diff, no_sync
from tiny_models import MODELS, cached_model, cached_stream, dense_nll

N_TOKENS = 60
POLICIES = {"h2o": H2O, "tova": TOVA}
RATES = {"strict": 1, "lazy": 8}
MODES = ("cache", "absolute")


def policy(name: str, rate: str):
    return POLICIES[name](n_sink=2, window=4, heavy=6, compress_every=RATES[rate])


@functools.cache
def run(engine: str, model_name: str, name: str, rate: str, mode: str):
    schedule = build_schedule(policy(name, rate), N_TOKENS)
    return engines.get(engine).function(cached_model(model_name), cached_stream(N_TOKENS), schedule,
                                        position_mode=mode, loss_dtype="float64")


# How the oracle turns one dense forward's attention into per-token scores. attention: [layers, heads,
# queries, keys] probabilities over original indices; t: the query that triggers the prune.
def mean_layers_heads(attention):
    return attention.mean(dim=(0, 1))


def accumulated(matrix, t):      # H2O: every query so far (a key is seen only while it is cached)
    return matrix[:t + 1].sum(0)


def current(matrix, t):          # TOVA: the query just fed
    return matrix[t]


SCORES = {"h2o": accumulated, "tova": current}


def oracle(model_name: str, name: str, rate: str, *, aggregate=mean_layers_heads, score=None):
    """(kept token lists at each prune, per-token NLL) of the policy in absolute positions."""
    p, model, ids = policy(name, rate), cached_model(model_name), cached_stream(N_TOKENS)
    score = score or SCORES[name]
    n = N_TOKENS - 1                     # tokens fed; the last one only is predicted
    seen = torch.zeros(n, n, dtype=torch.bool)
    visible, kept = [], []
    for t in range(n):
        visible.append(t)
        seen[t, visible] = True
        step_ends = t >= p.cap_total - 1  # the prefill is one step of cap_total tokens, then one token a step
        if step_ends and len(visible) - p.cap_total >= p.compress_every:
            s = score(aggregate(_attention(model, ids[:t + 1], seen[:t + 1, :t + 1])), t)
            middle = visible[p.n_sink:len(visible) - p.window]
            heavy = sorted(sorted(middle, key=lambda j: (-s[j].item(), j))[:p.heavy])
            visible = visible[:p.n_sink] + heavy + visible[len(visible) - p.window:]
            kept.append(list(visible))
    mask = torch.zeros(n, n, dtype=torch.float64).masked_fill(~seen, torch.finfo(torch.float64).min)
    return kept, dense_nll(model, ids, mask[None, None])


def _attention(model, ids, seen) -> torch.Tensor:
    """[layers, heads, queries, keys]: the attention probabilities of one forward at original positions in
    which query t sees the keys seen[t], from transformers' own eager attention (its softmax in fp32: the
    scores carry 1e-7 relative rounding, far below the gaps the choices are made on)."""
    mask = torch.zeros(seen.shape, dtype=torch.float64).masked_fill(~seen, torch.finfo(torch.float64).min)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(input_ids=ids[None], position_ids=torch.arange(ids.numel())[None],
                        attention_mask=mask[None, None], output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    return torch.stack(out.attentions)[:, 0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rate", sorted(RATES))
@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_decode_matches_reference(model_name, name, rate, mode):
    schedule = build_schedule(policy(name, rate), N_TOKENS)
    assert schedule.n_prunes >= 5, "the case must exercise eviction"
    assert_decode_equals_reference(run("reference", model_name, name, rate, mode),
                                   run("decode", model_name, name, rate, mode), schedule)


@pytest.mark.parametrize("rate", sorted(RATES))
@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_engines_keep_what_the_oracle_keeps(model_name, name, rate):
    kept, expected = oracle(model_name, name, rate)
    assert len(kept) == build_schedule(policy(name, rate), N_TOKENS).n_prunes
    # The keep sets are not Start+Recent's: the scores chose tokens outside the recent run.
    assert any(k != k[:2] + list(range(k[-1] - len(k) + 3, k[-1] + 1)) for k in kept)
    for engine in ("reference", "decode"):
        assert max_diff(run(engine, model_name, name, rate, "absolute").nll, expected) <= EXACT


PERTURBED = {
    "layer-0-only": dict(aggregate=lambda a: a[0].mean(0)),
    "last-layer-only": dict(aggregate=lambda a: a[-1].mean(0)),
    "head-0-only": dict(aggregate=lambda a: a[:, 0].mean(0)),
    "previous-query": dict(score=lambda m, t: m[t - 1]),
    "queries-before-the-current": dict(score=lambda m, t: m[:t].sum(0)),
}


@pytest.mark.parametrize("perturbed", sorted(PERTURBED))
@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_a_wrong_aggregation_or_step_is_caught(model_name, name, perturbed):
    """The oracle's test can fail: scores from another aggregation or another step keep other tokens,
    and the NLL moves by more than BROKEN."""
    kept, _ = oracle(model_name, name, "strict")
    wrong_kept, wrong = oracle(model_name, name, "strict", **PERTURBED[perturbed])
    assert wrong_kept != kept
    assert max_diff(run("decode", model_name, name, "strict", "absolute").nll, wrong) > BROKEN


ENGINE_MUTATIONS = {
    "layer-0-only": (scoring, "aggregate", lambda attentions: attentions[0][0].to(torch.float64).mean(0)),
    "h2o-without-the-current-query": (H2O, "score", lambda self, carried, attention: carried + attention[:-1].sum(0)),
}


@pytest.mark.parametrize("mutation", sorted(ENGINE_MUTATIONS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_an_engine_scoring_the_wrong_layer_or_step_misses_the_oracle(model_name, mutation, monkeypatch):
    monkeypatch.setattr(*ENGINE_MUTATIONS[mutation])
    schedule = build_schedule(policy("h2o", "strict"), N_TOKENS)
    broken = engines.get("decode").function(cached_model(model_name), cached_stream(N_TOKENS), schedule,
                                            position_mode="absolute", loss_dtype="float64")
    assert max_diff(broken.nll, oracle(model_name, "h2o", "strict")[1]) > BROKEN


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_policies_differ(model_name):
    """Guards the fixtures: H2O, TOVA and Lazy Pruning at the same cap and R keep different tokens."""
    lazy = PolicySpec.auto_cap(policy("h2o", "lazy").cap_total, 2, compress_every=RATES["lazy"])
    plain = engines.get("decode").function(cached_model(model_name), cached_stream(N_TOKENS),
                                           build_schedule(lazy, N_TOKENS), loss_dtype="float64")
    h2o, tova = (run("decode", model_name, name, "lazy", "cache") for name in ("h2o", "tova"))
    assert min(max_diff(h2o.nll, tova.nll), max_diff(h2o.nll, plain.nll), max_diff(tova.nll, plain.nll)) > BROKEN


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_scoring_never_waits_for_the_device(name, mode, monkeypatch):
    """Scoring and choosing the kept slots stay on the device: the decode loop's no-sync promise holds
    for score policies too (CUDA's sync debug mode "error" around every attend and prune)."""
    for method in ("attend", "prune"):
        monkeypatch.setattr(scoring.Scores, method, no_sync(getattr(scoring.Scores, method)))
    schedule = build_schedule(policy(name, "lazy"), N_TOKENS)
    result = engines.get("decode").function(MODELS["llama"]().cuda(), cached_stream(N_TOKENS), schedule,
                                            position_mode=mode, loss_dtype="float64")
    assert max_diff(result.nll, run("reference", "llama", name, "lazy", mode).nll) <= EXACT


DEMO_TOKENS = 128


@functools.cache
def demo():
    """The committed demo checkpoint in float64 and the first DEMO_TOKENS of its short stream."""
    spec = assets.demo_model_spec()
    ids, _ = assets.load_stream("demo-short", assets.DEMO_STREAMS["demo-short"], assets.load_tokenizer(spec),
                                DEMO_TOKENS)
    return assets.load_model(spec, "cpu").to(torch.float64), ids


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rate", sorted(RATES))
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_decode_matches_reference_on_the_demo_model(name, rate, mode):
    """The model of `make paper` (demo), at the demo's S = 4, half of the rest scored, on its own text."""
    model, ids = demo()
    schedule = build_schedule(POLICIES[name].auto_cap(40, 4, heavy=18, compress_every=RATES[rate]), DEMO_TOKENS)
    assert schedule.n_prunes >= 10
    ref, dec = (engines.get(e).function(model, ids, schedule, position_mode=mode, loss_dtype="float64")
                for e in ("reference", "decode"))
    assert ref.cache_len_after_step == dec.cache_len_after_step == schedule.cache_len_after_step
    assert max_diff(dec.nll, ref.nll) <= EXACT
