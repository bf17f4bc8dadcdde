"""reports.why_stale: a stale result says, in words, what differs from the plan (issue 15's GPU run: tables
built without the run's MIT_BENCH_GEN_TOKENS left every bench cell empty with no reason given)."""
from __future__ import annotations

import dataclasses

from streamkv.policies import PolicySpec
from streamkv.reports import why_stale
from streamkv.runspec import RunSpec
from streamkv.spec import DataSpec, ModelSpec

PLANNED = RunSpec(model=ModelSpec("m", "0" * 40), data=DataSpec("d", "d.json", "f" * 64, 100), mode="streaming",
                  policy=PolicySpec(n_sink=4, window=12, compress_every=8), engine="decode")


def stored(spec: RunSpec, **code_changes) -> dict:
    code = spec.code_identity()
    code["engines"] = {**code["engines"], **code_changes}
    return {"spec": spec.to_dict(), "code": code}


def test_a_knob_that_differs_is_named_with_both_values():
    other = dataclasses.replace(PLANNED, policy=dataclasses.replace(PLANNED.policy, compress_every=16))
    assert why_stale(PLANNED, stored(other)) == "policy.compress_every: stored 16, planned 8"


def test_moved_code_is_named_after_the_knobs():
    other = dataclasses.replace(PLANNED, data=dataclasses.replace(PLANNED.data, n_tokens=90))
    assert why_stale(PLANNED, stored(other, decode="0" * 64)) == \
        "data.n_tokens: stored 90, planned 100; the code of engines.decode changed"


def test_a_point_planned_without_its_stream_points_at_the_knobs():
    assert "MIT_BENCH_GEN_TOKENS" in why_stale(None, stored(PLANNED))


def test_only_hashed_fields_count():
    # The stream file's path is recorded, not hashed (DataSpec.path): moving it leaves nothing to name, even
    # beside a real difference.
    other = dataclasses.replace(PLANNED, data=dataclasses.replace(PLANNED.data, path="elsewhere.json"),
                                loss_dtype="float64")
    assert why_stale(PLANNED, stored(other)) == "loss_dtype: stored 'float64', planned 'float32'"
