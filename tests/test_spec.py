"""streamkv.spec: knob combinations a RunSpec refuses; what config_hash covers and what it leaves out."""
import dataclasses
from dataclasses import dataclass, field

import pytest

from streamkv import code_identity, engines
from streamkv.spec import DataSpec, MeasureSpec, ModelSpec, PolicySpec, RunSpec, SpecError, hashed_fields, since

from conftest import edit_engine, edit_source

COMMON = dict(model=ModelSpec("m", "0" * 40), data=DataSpec("d", "d.json", "f" * 64, 10))
STREAMING = dict(COMMON, mode="streaming", policy=PolicySpec(n_sink=2, window=6, compress_every=2))
BASELINE = dict(COMMON, mode="baseline", policy=PolicySpec(n_sink=4, window=4), engine="recompute")


@pytest.mark.parametrize("engine", ["reference", "parallel", "fast"])
def test_composed_fp16_needs_the_decode_engine(engine):
    timed = MeasureSpec(timing_engine="decode")
    with pytest.raises(SpecError, match=f"which the {engine} engine never does"):
        RunSpec(**STREAMING, rerotation="composed_fp16", engine=engine, measure=timed)
    RunSpec(**STREAMING, rerotation="exact", engine=engine, measure=timed)


@pytest.mark.parametrize("engine", ["reference", "parallel"])
def test_an_engine_that_does_not_time_itself_needs_a_timing_engine(engine):
    with pytest.raises(SpecError, match="does not time itself"):
        RunSpec(**STREAMING, engine=engine)
    with pytest.raises(SpecError, match="does not time itself"):
        RunSpec(**STREAMING, engine="decode", measure=MeasureSpec(timing_engine=engine))


def test_composed_fp16_on_decode_in_cache_mode_only():
    assert RunSpec(**STREAMING, rerotation="composed_fp16", engine="decode").rerotation == "composed_fp16"
    with pytest.raises(SpecError, match="absolute mode never moves a key"):
        RunSpec(**STREAMING, rerotation="composed_fp16", engine="decode", position_mode="absolute")


@pytest.mark.parametrize("knobs", [{"position_mode": "absolute"}, {"rerotation": "composed_fp16"}])
def test_baseline_takes_no_position_knobs(knobs):
    with pytest.raises(SpecError, match="recompute baseline takes position_mode cache and rerotation exact"):
        RunSpec(**BASELINE, **knobs)
    assert RunSpec(**BASELINE).engine == "recompute"


def test_hash_leaves_out_what_cannot_move_a_number():
    spec = RunSpec(**STREAMING)
    moved = dataclasses.replace(spec, data=dataclasses.replace(spec.data, path="elsewhere/d.json"))
    assert moved.config_hash() == spec.config_hash()
    # Under auto-cap, overlap only trades W for O: the recent run W + O, and so the schedule, is the same.
    plain, overlapped = PolicySpec.auto_cap(8, 2, compress_every=4), PolicySpec.auto_cap(8, 2, overlap=3,
                                                                                        compress_every=4)
    assert plain.window == overlapped.window + 3
    assert RunSpec(**dict(STREAMING, policy=plain)).config_hash() == \
        RunSpec(**dict(STREAMING, policy=overlapped)).config_hash()
    # δ cannot act while σ < R or R = 0 (test_policies proves the schedules equal); where it can, it counts.
    def lazy(R, sigma, delta):
        return RunSpec(**dict(STREAMING, policy=PolicySpec.auto_cap(8, 1, compress_every=R, cache_slack=sigma,
                                                                   max_drop=delta))).config_hash()
    assert lazy(4, 3, 2) == lazy(4, 3, 0) and lazy(0, 4, 2) == lazy(0, 4, 0)
    assert lazy(4, 4, 2) != lazy(4, 4, 0) and lazy(4, 3, 0) != lazy(4, 4, 0)
    # The baseline's S/W split is the seed's record; only their sum, the recompute window, counts.
    split = dict(BASELINE, policy=PolicySpec(n_sink=2, window=6))
    assert RunSpec(**split).config_hash() == RunSpec(**BASELINE).config_hash()
    assert RunSpec(**dict(BASELINE, policy=PolicySpec(n_sink=4, window=5))).config_hash() != \
        RunSpec(**BASELINE).config_hash()


@pytest.mark.parametrize("change", [
    dict(policy=PolicySpec(n_sink=2, window=7, compress_every=2)),
    dict(policy=PolicySpec(n_sink=2, window=6, compress_every=3)),
    dict(position_mode="absolute"), dict(engine="reference", measure=MeasureSpec(timing_engine="decode")),
    dict(device="cuda"), dict(loss_dtype="float64"),
    dict(data=DataSpec("d", "d.json", "e" * 64, 10)), dict(model=ModelSpec("m", "1" * 40)),
])
def test_hash_covers_what_moves_a_number(change):
    assert RunSpec(**{**STREAMING, **change}).config_hash() != RunSpec(**STREAMING).config_hash()


def test_a_field_added_with_its_neutral_value_keeps_old_hashes():
    @dataclass(frozen=True)
    class Old:
        a: int

    @dataclass(frozen=True)
    class New:
        a: int
        b: int = field(default=0, metadata=since(0))

    assert hashed_fields(New(1)) == hashed_fields(Old(1)) == {"a": 1}
    assert hashed_fields(New(1, b=2)) == {"a": 1, "b": 2}


def test_code_identity_names_the_engines_that_made_the_numbers(monkeypatch):
    parallel = RunSpec(**STREAMING, engine="parallel", measure=MeasureSpec(timing_engine="decode"))
    decode, baseline = RunSpec(**STREAMING), RunSpec(**BASELINE)

    def ident(name):
        return engines.get(name).identity

    assert parallel.code_identity() == {"engines": {"decode": ident("decode"), "parallel": ident("parallel")},
                                        "policies": code_identity.identity("streamkv.policies")}
    assert baseline.code_identity() == {"engines": {"recompute": ident("recompute")}}   # no schedule behind it
    hashes = {s: s.config_hash() for s in (parallel, decode, baseline)}
    edit_engine(monkeypatch, "parallel")
    assert [s.config_hash() == h for s, h in hashes.items()] == [False, True, True]
    edit_engine(monkeypatch, "decode")
    assert [s.config_hash() == h for s, h in hashes.items()] == [False, False, True]
    edit_source(monkeypatch, "streamkv.policies")
    assert baseline.config_hash() == hashes[baseline]
