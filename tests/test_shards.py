"""The recompute baseline split into token ranges: the ranges tile the stream, and the merged per-token NLL,
perplexity and config_hash equal the unsharded run's exactly."""
from __future__ import annotations


import pytest
import torch

from streamkv import shards
from streamkv.engines.recompute import evaluate_recompute
from streamkv.runner import Runner
from streamkv.policies import PolicySpec
from streamkv.store import Store, read_nll

from tiny_models import tiny_gpt_neox, token_stream
from tiny_runner import tiny  # noqa: F401 (fixture)


@pytest.mark.parametrize("n_tokens,cap,parts", [(48, 16, 1), (48, 16, 2), (48, 16, 5), (48, 16, 100),
                                               (17, 16, 3), (10, 16, 4), (2, 1, 2)])
def test_ranges_tile_the_predicted_tokens(n_tokens, cap, parts):
    ranges = shards.ranges(n_tokens, cap, parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == n_tokens - 1
    assert all(a < b for a, b in ranges) and all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
    prefill = min(cap, n_tokens - 1)
    assert ranges[0][1] >= prefill                              # the prefill forward is never split
    assert len(ranges) == min(parts, max(1, n_tokens - 1 - prefill))


def test_a_part_must_hold_the_whole_prefill_or_start_after_it():
    model, ids = tiny_gpt_neox(), token_stream(48)
    for bad in [(0, 10), (5, 30), (16, 48), (20, 20)]:
        with pytest.raises(ValueError, match="part"):
            evaluate_recompute(model, ids, 16, part=bad)


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_sharded_recompute_equals_unsharded_bit_for_bit(parts):
    model, ids = tiny_gpt_neox(dtype=torch.float32), token_stream(48)
    whole = evaluate_recompute(model, ids, 16)
    pieces = [(r, evaluate_recompute(model, ids, 16, part=r)) for r in shards.ranges(48, 16, parts)]
    merged = shards.merge(pieces, prefill=16)
    assert torch.equal(merged.nll, whole.nll)                   # same values, same order
    assert merged.ttft_ms == pieces[0][1].ttft_ms and all(p.ttft_ms is None for _, p in pieces[1:])
    assert merged.tpot_ms > 0 and merged.wall_s == pytest.approx(sum(p.wall_s for _, p in pieces))


def test_merge_refuses_ranges_that_do_not_tile():
    model, ids = tiny_gpt_neox(dtype=torch.float32), token_stream(48)
    a, b, c = shards.ranges(48, 16, 3)
    pieces = {r: evaluate_recompute(model, ids, 16, part=r) for r in (a, b, c)}
    with pytest.raises(ValueError, match="does not continue"):
        shards.merge([(a, pieces[a]), (c, pieces[c])], prefill=16)


def test_runner_writes_the_same_baseline_from_parts(tmp_path, tiny):
    _, make_spec = tiny
    spec = make_spec(mode="baseline", engine="recompute", policy=PolicySpec(n_sink=4, window=12))
    whole_store, split_store = Store(tmp_path / "whole"), Store(tmp_path / "split")
    whole = whole_store.read(Runner(whole_store, progress=False).run("baselines/long", spec))
    runner = Runner(split_store, progress=False)
    parts = [(r, runner.run_part(spec, r)) for r in shards.ranges(48, 16, 3)]
    split = split_store.read(runner.write_merged("baselines/long", spec, parts))
    assert split["config_hash"] == whole["config_hash"] == spec.config_hash()
    assert split["metrics"]["perplexity"] == whole["metrics"]["perplexity"]
    assert split["metrics"]["nll_sum"] == whole["metrics"]["nll_sum"]
    assert len(split["metrics"]["repeat_runs"]) == 2
    nll = [read_nll(s.path("baselines/long").parent / d["artifacts"]["nll"])
           for s, d in ((whole_store, whole), (split_store, split))]
    assert nll[0].tobytes() == nll[1].tobytes()
