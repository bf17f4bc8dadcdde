"""streamkv.code_identity: the code part of the config hash, derived from the source."""
import ast

import pytest

from streamkv import code_identity, engines
from streamkv.policies import PolicySpec
from streamkv.runspec import RunSpec
from streamkv.spec import DataSpec, MeasureSpec, ModelSpec

from conftest import edit_source

COMMON = dict(model=ModelSpec("m", "0" * 40), data=DataSpec("d", "d.json", "f" * 64, 10))


def identities() -> dict[str, str]:
    return {name: engines.get(name).identity for name in engines.names()}


def test_an_edit_to_positions_makes_exactly_the_engines_that_use_it_stale(monkeypatch):
    """decode (and periods, which runs it) and parallel turn keys with positions.rotate; reference has its
    own rotation, fast its own tables, the baseline no rotation at all."""
    before = identities()
    baseline = RunSpec(**COMMON, mode="baseline", policy=PolicySpec(n_sink=4, window=4), engine="recompute")
    timed_by_fast = RunSpec(**COMMON, mode="streaming", policy=PolicySpec(n_sink=2, window=6, compress_every=2),
                            engine="reference", measure=MeasureSpec(timing_engine="fast"))
    decoded = RunSpec(**COMMON, mode="streaming", policy=PolicySpec(n_sink=2, window=6, compress_every=2))
    hashes = [s.config_hash() for s in (baseline, timed_by_fast, decoded)]
    edit_source(monkeypatch, "streamkv.positions",
                lambda source: source.replace("freqs = delta.to(dtype)[:, None] * inv[None, :]",
                                              "freqs = (delta.to(dtype) + 1)[:, None] * inv[None, :]"))
    after = identities()
    assert {name for name in before if before[name] != after[name]} == {"decode", "parallel", "periods"}
    assert [s.config_hash() == h for s, h in zip((baseline, timed_by_fast, decoded), hashes)] == [True, True, False]


def test_comments_docstrings_and_layout_do_not_count(monkeypatch):
    module = "streamkv.metrics"
    original = code_identity.identity(module)

    def same_code(source):
        source = source.replace('"""Accept "float32"', '"""Take "float32"')                   # a docstring
        source = source.replace("def perplexity(", "# an added comment\n\n\ndef perplexity(")   # comment, lines
        return source.replace("n = nll.numel()", "n = (\n        nll.numel()\n    )")          # wrapping

    edit_source(monkeypatch, module, same_code)
    assert code_identity._source(code_identity._path(module)) != code_identity._path(module).read_text()
    assert code_identity.identity(module) == original
    edit_source(monkeypatch, module, lambda source: source.replace("total / n", "total / (n + 0)"))
    assert code_identity.identity(module) != original


def test_a_field_a_newer_python_adds_empty_does_not_count():
    """Python 3.12 gives every FunctionDef a `type_params` list; for unchanged code it is empty."""
    tree = ast.parse("def f(x):\n    return x\n")
    plain = code_identity._canonical(tree)
    function = tree.body[0]
    function._fields = (*function._fields, "type_params")
    function.type_params = []
    assert code_identity._canonical(tree) == plain
    function.type_params = [ast.Name("T")]
    assert code_identity._canonical(tree) != plain


def test_only_in_package_modules_and_only_what_is_named():
    digest, imports = code_identity._module("streamkv.engines.decode")
    assert len(digest) == 64
    # torch, tqdm: not ours; `from .. import compat`: the module; `from ..metrics import X`: metrics.
    assert imports == {"streamkv.compat", "streamkv.metrics", "streamkv.policies.schedule", "streamkv.positions",
                       "streamkv.engines.attention", "streamkv.engines.base"}
    with pytest.raises(ValueError, match="not a module of streamkv"):
        code_identity.identity("torch")
