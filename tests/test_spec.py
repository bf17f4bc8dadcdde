"""streamkv.spec: knob combinations a RunSpec refuses."""
import pytest

from streamkv.spec import DataSpec, MeasureSpec, ModelSpec, PolicySpec, RunSpec, SpecError

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
