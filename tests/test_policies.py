"""Property tests of the pure eviction schedules (streamkv/policies/lazy.py) and the auto-cap rule."""
import pytest
from hypothesis import given, settings, strategies as st

from streamkv.policies import H2O, TOVA, CacheView, PolicySpec, Pruner, build_schedule
from streamkv.spec import SpecError


@st.composite
def policies(draw, refresh=True):
    n_sink = draw(st.integers(0, 6))
    window = draw(st.integers(1, 24))
    overlap = draw(st.integers(0, 4))
    budget = draw(st.integers(0, 4)) if refresh else 0
    how = draw(st.sampled_from(["uniform", "middle"])) if budget else "none"
    return PolicySpec(n_sink=n_sink, window=window, overlap=overlap, refresh_budget=budget, refresh_policy=how,
                      compress_every=draw(st.integers(0, 12)), cache_slack=draw(st.integers(0, 16)),
                      max_drop=draw(st.integers(0, 16)))


def _replay(policy, n_tokens):
    """Return the schedule together with the list of tokens each step's cache really holds."""
    sched = build_schedule(policy, n_tokens)
    held = []
    for step in sched:
        grown = step.before.indices() + list(range(step.fed_start, step.fed_end))
        after = grown if step.keep is None else [grown[i] for i in step.keep]
        assert after == step.after.indices(), "keep slots and the after-view disagree"
        held.append(after)
    return sched, held


@settings(max_examples=150, deadline=None, derandomize=True)
@given(policies(), st.integers(2, 160))
def test_schedule_invariants(policy, n_tokens):
    sched, held = _replay(policy, n_tokens)
    assert sched.prefill_len == min(policy.cap_total, n_tokens)
    # Each step's `before` is the previous step's `after`: no token appears or vanishes between steps.
    for prev, step in zip(sched.steps, sched.steps[1:]):
        assert step.before == prev.after
        assert step.fed_start == prev.fed_end and step.fed_end == step.fed_start + 1
    # Every token but the last is fed exactly once, so every method predicts n_tokens - 1 tokens.
    assert sched.steps[-1].fed_end == n_tokens - 1 or (len(sched.steps) == 1 and sched.prefill_len == n_tokens)
    bound = policy.soft + max(policy.compress_every, 1) - 1
    for step, tokens in zip(sched.steps, held):
        assert tokens == sorted(set(tokens)), "cache slots hold distinct tokens in original order"
        end = step.fed_end
        # Sinks always kept: the first min(S, L) tokens stay once a prune has happened.
        n_sink = min(policy.n_sink, len(tokens))
        assert tokens[:n_sink] == list(range(n_sink))
        # The recent run is contiguous and ends with the newest token.
        view = step.after
        assert view.end == end and list(range(view.start, view.end)) == tokens[len(tokens) - (view.end - view.start):]
        assert len(view.refresh) <= policy.refresh_budget
        if not policy.never_prunes and step.index > 0:
            # Lazy pruning lets the cache reach soft + R - 1 before the prune that follows it.
            assert len(tokens) <= max(bound, policy.cap_total)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(policies(refresh=False), st.integers(2, 200))
def test_prune_count_per_stream(policy, n_tokens):
    sched = build_schedule(policy, n_tokens)
    if policy.never_prunes:
        assert sched.n_prunes == 0
        assert sched.cache_len_after_step[-1] == n_tokens - 1 if len(sched.steps) > 1 else True
    if policy.max_drop == 0 and policy.compress_every > 0:
        # Without max_drop every prune cuts to soft, and the cache regrows one token per step, so after the
        # first prune one prune happens every R steps: count them from the lengths alone.
        lengths = [len(s.before) + (s.fed_end - s.fed_start) for s in sched.steps]
        expected = sum(L - policy.soft >= policy.compress_every for L in lengths)
        assert sched.n_prunes == expected
        assert all(len(s.after) == policy.soft for s in sched.steps if s.keep is not None)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.integers(0, 8), st.integers(2, 40), st.integers(2, 16), st.data(), st.integers(2, 200))
def test_max_drop_changes_nothing_when_slack_below_R(n_sink, window, R, data, n_tokens):
    sigma = data.draw(st.integers(0, R - 1))
    base = PolicySpec(n_sink=n_sink, window=window, compress_every=R, cache_slack=sigma)
    with_drop = PolicySpec(n_sink=n_sink, window=window, compress_every=R, cache_slack=sigma,
                           max_drop=data.draw(st.integers(1, 32)))
    assert build_schedule(base, n_tokens).steps == build_schedule(with_drop, n_tokens).steps


def test_max_drop_acts_when_slack_reaches_R():
    base = PolicySpec(n_sink=4, window=16, compress_every=4, cache_slack=8)
    lazy = PolicySpec(n_sink=4, window=16, compress_every=4, cache_slack=8, max_drop=2)
    assert build_schedule(base, 80).steps != build_schedule(lazy, 80).steps


def test_strict_is_start_plus_recent():
    policy = PolicySpec.auto_cap(16, 4, compress_every=1)
    sched = build_schedule(policy, 40)
    # After the prefill (16 tokens = soft) the cache never exceeds soft: one eviction per token.
    assert sched.cache_len_after_step == [16] * len(sched.steps)
    last = sched.steps[-1].after
    assert last.indices() == [0, 1, 2, 3] + list(range(39 - 12, 39))


def test_lazy_first_prune_right_after_prefill_when_slack_reaches_R():
    policy = PolicySpec.auto_cap(32, 4, compress_every=8, cache_slack=8)
    sched = build_schedule(policy, 60)
    assert sched.steps[0].keep is not None and len(sched.steps[0].after) == policy.soft
    assert max(sched.cache_len_after_step) == policy.soft + 7
    assert sched.max_visible == policy.soft + 8  # soft + R - 1 cached keys plus the new token


def test_cooldown_blocks_prunes_below_hard():
    # δ > 0 and σ > 0: after a prune to L - δ, no prune may happen within R steps while L <= hard.
    policy = PolicySpec(n_sink=2, window=10, compress_every=2, cache_slack=6, max_drop=1)
    pruner = Pruner(policy)
    decisions = [pruner.target(L) for L in (18, 18, 18, 19)]
    assert decisions[0] == 17           # min(max(18 - 1, 12), hard - (R - 1) = 17)
    assert decisions[1] is None         # cooldown: step 1 < 0 + R and L = 18 <= hard
    assert decisions[2] == 17           # cooldown over
    assert decisions[3] == 17           # still cooling down, but L = 19 > hard = 18 overrides it


def test_refresh_tokens_come_from_evicted_middle():
    policy = PolicySpec(n_sink=2, window=6, refresh_budget=2, refresh_policy="uniform", compress_every=4)
    sched = build_schedule(policy, 50)
    for step in sched:
        view = step.after
        assert all(view.n_sink <= j < view.start for j in view.refresh)
        assert len(view) <= policy.soft + policy.compress_every - 1


@pytest.mark.parametrize("kwargs", [dict(cap_total=8, n_sink=4, cache_slack=4),
                                    dict(cap_total=16, n_sink=4, cache_slack=4, overlap=4, refresh_budget=4,
                                         refresh_policy="uniform")])
def test_auto_cap_refuses_empty_window(kwargs):
    with pytest.raises(SpecError, match="auto-cap leaves window"):
        PolicySpec.auto_cap(**kwargs)


def test_auto_cap_matches_seed():
    p = PolicySpec.auto_cap(2048, 32, compress_every=64)
    assert p.window == 2016 and p.cap_total == 2048
    p = PolicySpec.auto_cap(2048, 32, compress_every=64, cache_slack=16)
    assert p.window == 2000 and p.hard == 2048


@pytest.mark.parametrize("kwargs, msg", [(dict(compress_every=-1), "compress_every"),
                                         (dict(refresh_policy="lru"), "refresh_policy"),
                                         (dict(refresh_budget=2), "refresh_budget")])
def test_bad_knobs(kwargs, msg):
    with pytest.raises(SpecError, match=msg):
        PolicySpec(n_sink=4, window=8, **kwargs)


def test_view_slots():
    view = CacheView(n_sink=2, refresh=(5, 7), start=10, end=13)
    assert view.indices() == [0, 1, 5, 7, 10, 11, 12] and len(view) == 7 and not view.contiguous
    assert [view.token_at(i) for i in range(len(view))] == view.indices()
    with pytest.raises(IndexError):
        view.token_at(len(view))


def test_strict_schedule_shares_one_keep_tuple():
    # The paper's strict schedule prunes after every token; identical prunes must not each hold C ints.
    policy = PolicySpec.auto_cap(64, 4, compress_every=1)
    sched, _ = _replay(policy, 400)
    keeps = {id(s.keep) for s in sched.steps[1:]}
    assert sched.n_prunes == len(sched.steps) - 1 and len(keeps) == 1


def test_too_short_stream_is_a_spec_error():
    with pytest.raises(SpecError, match="at least 2 tokens"):
        build_schedule(PolicySpec.auto_cap(16, 4, compress_every=1), 1)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.sampled_from([H2O, TOVA]), st.integers(0, 4), st.integers(1, 8), st.integers(1, 8), st.integers(1, 12),
       st.integers(2, 120))
def test_score_policies_prune_on_the_lazy_rule(unit, n_sink, window, heavy, R, n_tokens):
    """Score policies prune when the cache exceeds C = S + W + H by R, back to C: the schedule of Lazy
    Pruning with soft = C (σ = δ = 0); only which tokens stay differs, and that is decided at run time."""
    scored = build_schedule(unit(n_sink=n_sink, window=window, heavy=heavy, compress_every=R), n_tokens)
    lazy = build_schedule(PolicySpec(n_sink=n_sink, window=window + heavy, compress_every=R), n_tokens)
    assert scored.cache_len_after_step == lazy.cache_len_after_step
    assert (scored.n_prunes, scored.max_visible, scored.prefill_len) == (lazy.n_prunes, lazy.max_visible,
                                                                         lazy.prefill_len)
    assert [(s.fed_start, s.fed_end) for s in scored] == [(s.fed_start, s.fed_end) for s in lazy]
    assert not scored.contiguous and lazy.scores() is None


@pytest.mark.parametrize("knobs, msg", [(dict(heavy=0), "heavy must be > 0"), (dict(window=0), "window must be > 0"),
                                        (dict(compress_every=0), "compress_every must be > 0"),
                                        (dict(n_sink=-1), "n_sink must be >= 0")])
def test_bad_score_knobs(knobs, msg):
    with pytest.raises(SpecError, match=msg):
        H2O(**{**dict(n_sink=2, window=4, heavy=4, compress_every=1), **knobs})
    with pytest.raises(SpecError, match="auto-cap leaves window 0"):
        TOVA.auto_cap(8, 2, heavy=6)
