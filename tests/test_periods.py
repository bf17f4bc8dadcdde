"""The periods engine (streamkv/engines/periods.py): one forward per prune period computes the decode
engine's function, so it equals the float64 reference on every schedule and policy the decode engine is
checked on, with far fewer forwards; merging across a prune is caught."""
from __future__ import annotations

import dataclasses
import functools

import pytest

from bounds import BROKEN, EXACT
from streamkv import compat, engines
from streamkv.engines import decode, periods
from streamkv.policies import H2O, TOVA, PolicySpec, build_schedule
from test_engines import CASES, MODES, N_TOKENS, assert_decode_equals_reference, max_diff, run
from tiny_models import MODELS, cached_model, cached_stream

SCORED = {"h2o": H2O(n_sink=2, window=4, heavy=6, compress_every=8),
          "tova": TOVA(n_sink=2, window=4, heavy=6, compress_every=8)}


def evaluate(model_name: str, policy, mode: str = "cache", **options):
    schedule = build_schedule(policy, N_TOKENS)
    return schedule, periods.evaluate(cached_model(model_name), cached_stream(N_TOKENS), schedule,
                                      position_mode=mode, loss_dtype="float64", **options)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_periods_match_reference(model_name, case, mode):
    schedule, result = evaluate(model_name, CASES[case], mode)
    assert result.engine == "periods" and result.tpot_ms is None and result.ttft_ms is None
    assert_decode_equals_reference(run("reference", model_name, case, mode), result, schedule)


@functools.cache
def reference_scored(model_name: str, name: str, mode: str):
    schedule = build_schedule(SCORED[name], N_TOKENS)
    return engines.get("reference").function(cached_model(model_name), cached_stream(N_TOKENS), schedule,
                                             position_mode=mode, loss_dtype="float64")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(SCORED))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_score_policies_match_reference(model_name, name, mode):
    """A period's queries reach the policy in one call: H2O's sum and TOVA's last row do not depend on it."""
    schedule, result = evaluate(model_name, SCORED[name], mode)
    assert schedule.n_prunes >= 4
    assert_decode_equals_reference(reference_scored(model_name, name, mode), result, schedule)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_composed_fp16_is_decodes(model_name):
    """The ablation's fp16 drift is the same drift, prune for prune, as when decoding token by token."""
    policy = CASES["lazy_r4"]
    schedule, result = evaluate(model_name, policy, rerotation="composed_fp16")
    decoded = decode.evaluate(cached_model(model_name), cached_stream(N_TOKENS), schedule, position_mode="cache",
                              rerotation="composed_fp16", loss_dtype="float64")
    assert max_diff(result.nll, decoded.nll) <= EXACT
    assert max_diff(result.nll, run("decode", model_name, "lazy_r4", "cache").nll) > EXACT   # it drifted


@pytest.mark.parametrize("case", ["lazy_r4", "lazy_drop_r5", "refresh_middle", "full"])
def test_one_forward_per_period(case, monkeypatch):
    """The point of the engine: a forward per prune (plus one for a stream that ends between prunes),
    together feeding every token once, in order."""
    fed = []
    forward = compat.forward

    def counted(model, input_ids, **kwargs):
        fed.append(input_ids.shape[1])
        return forward(model, input_ids, **kwargs)
    monkeypatch.setattr(compat, "forward", counted)
    schedule, _ = evaluate("gpt_neox", CASES[case])
    ends_between_prunes = not schedule.steps[-1].prunes
    assert len(fed) == schedule.n_prunes + ends_between_prunes < len(schedule.steps)
    assert sum(fed) == N_TOKENS - 1


@pytest.mark.parametrize("policy", [CASES["lazy_r4"], SCORED["h2o"]], ids=["lazy", "h2o"])
def test_merging_across_a_prune_is_caught(policy, monkeypatch):
    """Guards the tests above: periods that ran over every other prune change the numbers."""
    schedule = build_schedule(policy, N_TOKENS)
    pruning = [s.index for s in schedule.steps if s.prunes]
    skipped = set(pruning[::2])
    monkeypatch.setattr(type(schedule.steps[0]), "prunes", property(lambda step: step.index in set(pruning) - skipped))
    honest = reference_scored("gpt_neox", "h2o", "cache") if isinstance(policy, H2O) \
        else run("reference", "gpt_neox", "lazy_r4", "cache")
    broken = periods.evaluate(cached_model("gpt_neox"), cached_stream(N_TOKENS), schedule, loss_dtype="float64")
    assert max_diff(broken.nll, honest.nll) > BROKEN


@pytest.mark.parametrize("policy", [CASES["lazy_drop_r5"], SCORED["tova"]], ids=["schedule", "scored"])
def test_a_period_is_its_steps_merged(policy):
    """Each period feeds its steps' tokens, starts from the cache before its first step and ends as its
    last step does; the periods tile the stream."""
    schedule = build_schedule(policy, N_TOKENS)
    grouped = periods.by_period(schedule)
    before = "before" if hasattr(schedule.steps[0], "before") else "length_before"
    steps = iter(schedule.steps)
    for k, period in enumerate(grouped.steps):
        run_ = [next(steps)]
        while run_[-1].fed_end != period.fed_end:
            run_.append(next(steps))
        assert period.index == k and period.fed_start == run_[0].fed_start
        assert getattr(period, before) == getattr(run_[0], before)
        assert period == dataclasses.replace(run_[-1], index=k, fed_start=run_[0].fed_start,
                                             **{before: getattr(run_[0], before)})
        assert not any(s.prunes for s in run_[:-1])
    assert next(steps, None) is None


def test_lengths_inside_a_period_follow_the_measured_ones():
    """Per-step lengths are derived from what the cache measured after each period, not copied from the
    schedule: one slot more measured after period 1 shows at its last step and every step of period 2
    but the last (which ends at period 2's own measured length)."""
    schedule = build_schedule(PolicySpec(n_sink=1, window=3, compress_every=3), 12)
    grouped = periods.by_period(schedule)
    measured = [len(s.after) for s in grouped.steps]
    assert periods.per_step_lengths(schedule, grouped, measured) == schedule.cache_len_after_step
    ends = [next(i for i, s in enumerate(schedule.steps) if s.fed_end == p.fed_end) for p in grouped.steps]
    shifted = set(range(ends[1], ends[2]))
    lengths = periods.per_step_lengths(schedule, grouped, [n + (k == 1) for k, n in enumerate(measured)])
    assert lengths == [n + (i in shifted) for i, n in enumerate(schedule.cache_len_after_step)]


def test_registry_declares_it_realises_what_decode_does():
    engine = engines.get("periods")
    assert engine.function is periods.evaluate and not engine.self_timed
    assert engine.composed_fp16 and engine.policy_kinds == engines.get("decode").policy_kinds


def test_its_progress_bar_is_named_periods(capsys):
    """A stage log shows which engine is running: periods' bar, not the decode loop's name."""
    evaluate(sorted(MODELS)[0], CASES[sorted(CASES)[0]], progress=True)
    err = capsys.readouterr().err
    assert "periods:" in err and "decode:" not in err
