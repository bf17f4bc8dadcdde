"""Profiles: the paper and demo points, ladders and grids, and how the knobs move them."""
from __future__ import annotations

import dataclasses

import pytest

from streamkv import assets, context, policies, profiles
from streamkv.policies import build_schedule
from streamkv.settings import Settings, SettingsError
from streamkv.spec import SpecError


def paper(**knobs):
    return profiles.resolve(Settings(profile="paper", **knobs))


def lazy(profile, label="lazy"):
    return next(v for v in profile.ablations(quality=True) if v.label == label)


def test_paper_profile_main_points_and_baseline():
    p = paper()
    strict, lazy_point = (p.policy(v) for v in p.main_variants())
    assert (lazy_point.n_sink, lazy_point.window, lazy_point.compress_every) == (32, 2016, 64)
    assert (strict.window, strict.compress_every) == (2016, 1) and strict.cap_total == lazy_point.cap_total == 2048
    assert (p.baseline_policy().n_sink, p.baseline_policy().window) == (4, 2044)
    assert (p.device, p.model.dtype, p.model.name) == ("cuda", "float16", "EleutherAI/pythia-2.8b")
    assert (p.long.path, p.long.max_tokens) == ("data/pg19/long_context_50000.json", 20000)
    assert (p.short.path, p.short.max_tokens) == ("data/wikitext/long_context_4096.json", 4096)
    assert (p.sweep_r, p.sweep_sigma, p.sweep_delta) == ((1, 16, 32, 64, 128), (0, 16, 32), (0, 16, 32))


def test_ablation_ladder():
    p = paper()
    assert [v.label for v in p.ablations(quality=False)] == [
        "strict", "lazy", "lazy_window_matched", "lazy_absolute", "lazy_composed_fp16", "lazy_no_sink", "h2o", "tova"]
    assert p.policy(lazy(p, "lazy_window_matched")).window == 2016 - 63   # cache never above the budget
    assert p.policy(lazy(p, "lazy_no_sink")).window == 2048                # auto-cap keeps the budget
    assert lazy(p, "lazy_absolute").position_mode == "absolute"
    assert lazy(p, "lazy_composed_fp16").rerotation == "composed_fp16"
    slack, maxdrop = p.policy(lazy(p, "lazy_slack")), p.policy(lazy(p, "lazy_slack_maxdrop"))
    assert (slack.cache_slack, slack.window, slack.cap_total) == (32, 1984, 2048)
    assert (maxdrop.cache_slack, maxdrop.max_drop, maxdrop.window) == (64, 32, 1952)
    # The score policies spend the same budget at the main R: half of what the sinks leave is chosen by score.
    for name, unit in (("h2o", policies.H2O), ("tova", policies.TOVA)):
        scored = p.policy(lazy(p, name))
        assert type(scored) is unit and scored.cap_total == 2048
        assert (scored.n_sink, scored.heavy, scored.window, scored.compress_every) == (32, 1008, 1008, 64)


def test_sweeps_and_the_delta_sweep_runs_at_sigma_equal_r():
    p = paper()
    assert list(p.sweeps(quality=False)) == ["R"]
    grids = p.sweeps(quality=True)
    assert [v.label for v in grids["R"]] == ["R=1", "R=16", "R=32", "R=64", "R=128"]
    sigma = [p.policy(v) for v in grids["sigma"]]
    assert [(q.cache_slack, q.window) for q in sigma] == [(0, 2016), (16, 2000), (32, 1984)]
    delta = [p.policy(v) for v in grids["delta"]]
    assert [(q.compress_every, q.cache_slack, q.max_drop) for q in delta] == [(64, 64, 0), (64, 64, 16), (64, 64, 32)]


def test_the_delta_sweep_moves_the_schedule_where_the_main_sigma_would_not(fakes):
    profile, _ = fakes
    grid = profile.sweeps(quality=True)["delta"]
    curves = {tuple(build_schedule(profile.policy(v), 64).cache_len_after_step) for v in grid}
    assert len(curves) == len(grid)
    at_main_sigma = [dataclasses.replace(v, knobs=(("max_drop", d),)) for v, d in zip(grid, profile.sweep_delta)]
    assert len({tuple(build_schedule(profile.policy(v), 64).cache_len_after_step) for v in at_main_sigma}) == 1


def test_knobs_move_the_profile():
    p = paper(cap_total=1024, sweep_r_values=(2, 8), pg19_sample_file="x/book.json", wikitext_sample_length=2048)
    assert p.policy(p.main_variants()[1]).window == 1024 - 32
    assert p.baseline_policy().window == 1020  # the baseline's cap follows CAP_TOTAL
    assert p.sweep_r == (2, 8) and p.long.path == "x/book.json"
    assert (p.short.path, p.short.max_tokens) == ("data/wikitext/long_context_2048.json", 2048)
    assert paper(baseline_sink=0, baseline_window=100).baseline_policy().window == 100
    assert paper(pg19_sample_length=30000).long.path == "data/pg19/long_context_30000.json"


def test_model_name_must_be_pinned():
    assert paper(model_name="EleutherAI/pythia-2.8b").model == paper().model
    assert paper(model_name="org/model@abc123").model.name == "org/model"
    assert paper(model_name="org/model@abc123").model.revision == "abc123"
    with pytest.raises(SettingsError, match="pinned"):
        paper(model_name="org/model")


def test_unknown_profile_and_a_window_that_auto_cap_cannot_fit():
    with pytest.raises(SettingsError, match="unknown profile 'huge'"):
        profiles.resolve(Settings(profile="huge"))
    p = paper(cap_total=40)
    with pytest.raises(SpecError, match="auto-cap leaves window"):
        p.policy(lazy(p, "lazy_slack_maxdrop"))


def test_paper_random_is_the_paper_plan_on_random_weights_and_short_synthetic_streams(tmp_path):
    real, timing = paper(), profiles.resolve(Settings(profile="paper-random"))
    # The same experiment set: points, ladders, grids and cap; only the weights and the streams differ.
    for attr in ("cap_total", "n_sink", "strict_r", "lazy_r", "sweep_r", "baseline_sink", "baseline_window",
                 "perplexity_engine", "timing_tokens", "device", "dtype"):
        assert getattr(timing, attr) == getattr(real, attr), attr
    assert [timing.policy(v) for v in timing.ablations(True)] == [real.policy(v) for v in real.ablations(True)]
    assert timing.model == real.model and timing.random_weights and not real.random_weights
    vocab = assets.vocab_size(real.model)
    assert vocab == 50304   # streamkv/configs/pythia-2.8b.json: ids over the embedding, no tokenizer
    assert [(d.name, d.path, d.max_tokens) for d in timing.datasets] == [
        ("synthetic-long", f"synthetic:1:{vocab}", 2048 + 256), ("synthetic-short", f"synthetic:2:{vocab}", 2048 + 128)]
    # Slots never meet the real datasets' (a shared results/ keeps both), and the stage context marks every
    # point's model random without a flag, so each config_hash differs from a real-weights one.
    assert not {d.name for d in timing.datasets} & {d.name for d in real.datasets}
    ctx = context.context(Settings(profile="paper-random", results_dir=str(tmp_path)), tokenize=False)
    assert ctx.random_weights and ctx.model.random_weights
    assert profiles.resolve(Settings(profile="paper-random", cap_total=1024)).long.max_tokens == 1024 + 256


def test_paper_random_full_is_paper_random_at_the_paper_stream_lengths():
    real, short, full = paper(), *(profiles.resolve(Settings(profile=p)) for p in ("paper-random", "paper-random-full"))
    assert dataclasses.replace(full, name=short.name, long=short.long, short=short.short) == short
    assert [d.max_tokens for d in full.datasets] == [d.max_tokens for d in real.datasets] == [20000, 4096]
    vocab = assets.vocab_size(real.model)
    assert [d.path for d in full.datasets] == [f"synthetic:3:{vocab}", f"synthetic:4:{vocab}"]
    # Its own stream names (so its slots), apart from the short run's and the real data's, in one results/.
    assert len({d.name for p in (real, short, full) for d in p.datasets}) == 6
    assert profiles.resolve(Settings(profile="paper-random-full", cap_total=1024)).long.max_tokens == 20000


def test_a_random_weights_profile_needs_a_config_it_can_read_without_a_download(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "CONFIG_DIR", tmp_path)   # no bundled config, no local checkpoint, no cache
    monkeypatch.setattr(assets, "_cached_snapshot", lambda spec: None)
    with pytest.raises(assets.AssetError, match="config of EleutherAI/pythia-2.8b@.* not found"):
        profiles.resolve(Settings(profile="paper-random"))


def test_demo_profile_data():
    d = profiles.DEMO
    assert (d.device, d.dtype, d.cap_total, d.n_sink, d.strict_r, d.lazy_r) == ("cpu", "float32", 256, 4, 1, 16)
    assert (d.baseline_sink, d.baseline_window) == (4, 252)
    assert (d.long.path, d.long.max_tokens) == ("data/demo/streams/demo-long.json", 4096)
    assert (d.short.path, d.short.max_tokens) == ("data/demo/streams/demo-short.json", 1024)
    assert (d.sweep_r, d.sweep_sigma, d.sweep_delta) == ((1, 4, 8, 16, 32), (0, 8, 16), (0, 8, 16))


def test_demo_profile_resolves_to_the_committed_checkpoint():
    p = profiles.resolve(Settings(model_name="EleutherAI/pythia-2.8b", pg19_sample_file="x.json", cap_total=128))
    assert p.model == assets.demo_model_spec("float32")   # the guide's paper knobs leave the demo alone
    assert p.long.path == "data/demo/streams/demo-long.json" and p.baseline_policy().window == 124


@pytest.mark.parametrize("name", sorted(profiles.PROFILES))
def test_timed_decodes_hold_whole_prune_periods_of_every_r(name):
    """A point timed on the timing prefix decodes whole periods of its R, so a TPOT has the share of prune
    steps a long run has, whichever R the point prunes at."""
    p = profiles.PROFILES[name]
    for r in {p.strict_r, p.lazy_r, *p.sweep_r}:
        assert p.timing_tokens % r == 0, (name, r)
