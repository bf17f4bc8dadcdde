"""streamkv.spec and streamkv.runspec: knob combinations a RunSpec refuses; what config_hash covers and what it leaves out."""
import ast
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from streamkv import code_identity, engines, policies, spec as spec_module
from streamkv.policies import PolicySpec
from streamkv.runspec import RunSpec
from streamkv.spec import DataSpec, MeasureSpec, ModelSpec, SpecError, digest, hashed_fields, since

from conftest import edit_engine, edit_source

PACKAGE = Path(spec_module.__file__).parent
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
                                        "policies": code_identity.identity("streamkv.policies.lazy")}
    assert baseline.code_identity() == {"engines": {"recompute": ident("recompute")}}   # no schedule behind it
    hashes = {s: s.config_hash() for s in (parallel, decode, baseline)}
    edit_engine(monkeypatch, "parallel")
    assert [s.config_hash() == h for s, h in hashes.items()] == [False, True, True]
    edit_engine(monkeypatch, "decode")
    assert [s.config_hash() == h for s, h in hashes.items()] == [False, False, True]
    edit_source(monkeypatch, "streamkv.policies.lazy")
    assert baseline.config_hash() == hashes[baseline]


def test_spec_imports_nothing_of_the_project():
    """spec.py is the bottom of the import graph: its code identity is its own, and nothing it imports can
    climb back up to the modules that import it."""
    digest_, imports = code_identity._module("streamkv.spec")
    assert imports == frozenset()
    tree = ast.parse(Path(spec_module.__file__).read_text())
    relative = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert relative == []


def _runtime_imports(module: str) -> set[str]:
    """The in-package modules `module` imports when it runs (function-level imports included, as
    code_identity reads them; annotations-only imports under `if TYPE_CHECKING:` left out)."""
    path = code_identity._path(module)
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        for name in ("body", "orelse"):
            block = getattr(node, name, None)
            if isinstance(block, list):
                setattr(node, name, [n for n in block if not (isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")])
    return code_identity._imports(module, path, tree)


def test_the_package_has_no_import_circle():
    """Every in-package import points down: no module imports one that (transitively) imports it."""
    modules = {f"streamkv.{p.relative_to(PACKAGE).with_suffix('').as_posix().replace('/', '.')}".removesuffix(".__init__")
               for p in PACKAGE.rglob("*.py")}
    graph = {m: _runtime_imports(m) for m in modules}
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import circle: {' -> '.join(path[path.index(module):] + [module])}"
        if module not in done:
            path.append(module)
            for imported in graph[module]:
                visit(imported)
            path.pop()
            done.add(module)

    for module in sorted(modules):
        visit(module)


# Regression anchor for the hashed view of existing points. Obtained before policies became a package
# (commit 0fcabfb, spec.RunSpec with spec.PolicySpec) by running, for each spec below,
# `spec.digest(RunSpec(...).hashed())`. Code identity is not part of it: it is derived from the source, so
# moving the policy code into streamkv/policies/ made stored streaming results stale once (README).
ANCHORED = [
    (dict(policy=PolicySpec.auto_cap(256, 4, compress_every=16)),
     "58ee65eaa173ef27c7a0870a46ce8855e0d380f53b2145fc4bb2c3954ee74240"),
    (dict(policy=PolicySpec.auto_cap(256, 4, compress_every=16, cache_slack=16, max_drop=8), position_mode="absolute",
          engine="parallel", measure=MeasureSpec(1, 3, 256, "decode")),
     "78825872ec157a5dcf3fd641ad985a38c887543e34f738069828e7fca148d868"),
    (dict(policy=PolicySpec.auto_cap(256, 4, compress_every=16, cache_slack=8, max_drop=8, overlap=3, refresh_budget=2,
                                     refresh_policy="uniform")),
     "e0ebaac9dfacfe600739312eee64c0a51db2ba1c4cc592096758c2a09a4c14b9"),
    (dict(mode="baseline", policy=PolicySpec(n_sink=4, window=252), engine="recompute"),
     "23fa3b57c76e1642e577f86ae69f29000892d5cc7992eea373b2cc4e0ad47caf"),
]


@pytest.mark.parametrize("knobs, expected", ANCHORED)
def test_existing_points_keep_their_hashed_view(knobs, expected):
    common = dict(model=ModelSpec("m", "0" * 40), data=DataSpec("d", "d.json", "f" * 64, 4096), mode="streaming")
    spec = RunSpec(**{**common, **knobs})
    assert digest(spec.hashed()) == expected
    if spec.mode == "streaming" and spec.policy.max_drop == 0:
        # The lazy family's view names no policy: the view these points had before policies had names.
        assert set(spec.hashed()["policy"]) == {"n_sink", "recent", "refresh_budget", "refresh_policy",
                                                "compress_every", "cache_slack", "max_drop"}


def test_a_score_policy_is_hashed_and_recorded_by_name(monkeypatch):
    h2o, tova = (RunSpec(**dict(STREAMING, policy=cls(n_sink=2, window=3, heavy=3, compress_every=2)))
                 for cls in (policies.H2O, policies.TOVA))
    lazy = RunSpec(**STREAMING)
    assert h2o.hashed()["policy"] == {"name": "h2o", "n_sink": 2, "window": 3, "heavy": 3, "compress_every": 2}
    assert len({s.config_hash() for s in (h2o, tova, lazy)}) == 3
    for spec in (h2o, tova, lazy):
        assert RunSpec.from_dict(spec.to_dict()) == spec
    # A result written before policies had names records the lazy knobs only.
    legacy = {k: v for k, v in lazy.to_dict()["policy"].items() if k != "name"}
    assert RunSpec.from_dict({**lazy.to_dict(), "policy": legacy}) == lazy
    # Each policy's code is its own: an edit to h2o.py makes only H2O points stale; the shared score
    # machinery makes both score policies stale, never the schedule family.
    hashes = {s: s.config_hash() for s in (h2o, tova, lazy)}
    edit_source(monkeypatch, "streamkv.policies.h2o")
    assert [s.config_hash() == h for s, h in hashes.items()] == [False, True, True]
    edit_source(monkeypatch, "streamkv.policies.scoring")
    assert [s.config_hash() == h for s, h in hashes.items()] == [False, False, True]


@pytest.mark.parametrize("engine", ["parallel", "fast"])
def test_engines_that_read_a_schedule_as_a_table_refuse_score_policies(engine):
    h2o = policies.H2O(n_sink=2, window=3, heavy=3, compress_every=2)
    with pytest.raises(SpecError, match=f"the {engine} engine realises schedule policies, not the score-based "
                                        "h2o: use an engine that hands it the attention \\(reference, decode, periods\\)"):
        RunSpec(**dict(STREAMING, policy=h2o), engine=engine, measure=MeasureSpec(timing_engine="decode"))
    if engines.get(engine).self_timed:
        with pytest.raises(SpecError, match="not the score-based h2o"):
            RunSpec(**dict(STREAMING, policy=h2o), measure=MeasureSpec(timing_engine=engine))
    assert engines.timing_engine(RunSpec(**dict(STREAMING, policy=h2o))) == "decode"
