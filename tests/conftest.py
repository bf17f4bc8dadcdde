"""Shared fakes for the stage, store and CLI tests: a small profile, fake streams and a fake runner.

The fakes replace only what loads a model or tokenizes text (streamkv.assets), the environment
fingerprint and the engines (through `FakeRunner`), so planning, reuse, staleness and the store run for
real. `worker_main` is also run as a subprocess by the kill -9 test (`python tests/conftest.py ...`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from streamkv import (assets, cli, code_identity, context, engines, fingerprint, plans, profiles,
                      runner as runner_mod, settings as settings_mod, stages, tables)
from streamkv.profiles import SWEEP_SYMBOLS, Dataset, Profile
from streamkv.settings import Settings
from streamkv.spec import DataSpec, ModelSpec
from streamkv.store import nll_bytes

FAKE_FINGERPRINT = {"git_commit": "0" * 40, "python": "3.11", "torch": "2.13.0", "cuda": None,
                    "transformers": "5.24.0", "gpu_name": None}
N_TOKENS = {"long": 64, "short": 32}


def fake_profile(tmp: Path) -> Profile:
    """demo-shaped, tiny: cap 16, S=2, strict R=1, lazy R=4."""
    long = Dataset("long", "Long", str(tmp / "long.json"), N_TOKENS["long"])
    short = Dataset("short", "Short", str(tmp / "short.json"), N_TOKENS["short"])
    for d in (long, short):
        Path(d.path).write_text(json.dumps({"text": d.name}))
    return Profile(name="demo", model_display="fake", dtype="float32", device="cpu", cap_total=16,
                   long=long, short=short, n_sink=2, strict_r=1, lazy_r=4, cache_slack=0, max_drop=0,
                   sweep_r=(1, 2, 4), sweep_sigma=(0, 2), sweep_delta=(0, 2), baseline_sink=4,
                   baseline_window=12, perplexity_engine="decode", timing_tokens=8,
                   model=ModelSpec(name="fake/model", revision="0" * 40, dtype="float32"))


def edit_source(monkeypatch, module: str, edit=lambda source: source + "\n_EDITED = 1\n") -> None:
    """`module` (dotted) as if its file had been edited: code identity reads `edit(source)` for it."""
    path, read = code_identity._path(module), code_identity._source
    assert path is not None, module
    monkeypatch.setattr(code_identity, "_source", lambda p: edit(read(p)) if p == path else read(p))
    monkeypatch.setattr(code_identity, "_modules", {})


def edit_engine(monkeypatch, engine: str) -> None:
    """The engine as if its module's code had changed."""
    edit_source(monkeypatch, engines.get(engine).module)


def scored(nll: list[float]) -> tuple[bytes, dict]:
    """(NLL artifact, metrics) of a result that passes the store's checks on read (schema.check_derived):
    nll_sum and perplexity derived from the float32 values the artifact holds."""
    raw = nll_bytes(nll)
    stored = struct.unpack(f"<{len(raw) // 4}f", raw)
    nll_sum = math.fsum(stored)
    return raw, {"perplexity": math.exp(nll_sum / len(stored)), "nll_sum": nll_sum, "n_predicted_tokens": len(stored)}


def install_fakes(monkeypatch) -> None:
    """Streams without a tokenizer and a fixed fingerprint; no model is ever loaded."""
    def load_stream(name, path, tokenizer, max_tokens=None):
        n = min(max_tokens, N_TOKENS[name])
        return list(range(n)), DataSpec(name=name, path=path, sha256="f" * 64, n_tokens=n)

    monkeypatch.setattr(assets, "load_tokenizer", lambda spec: object())
    monkeypatch.setattr(assets, "load_stream", load_stream)
    monkeypatch.setattr(fingerprint, "collect", lambda: dict(FAKE_FINGERPRINT))


class FakeRunner:
    """Writes a plausible result per point through the real store; records which slots it computed."""

    def __init__(self, store, *, delay: float = 0.0, fingerprint: dict | None = None, announce: bool = False):
        self.store, self.delay, self.announce = store, delay, announce
        self.fingerprint = fingerprint or {**FAKE_FINGERPRINT, "dtype": "torch.float32"}
        self.computed: list[str] = []

    def run(self, slot, spec, *, output=None):
        time.sleep(self.delay)
        # perplexity about 10 + R, derived from the NLL artifact as the store checks on read
        nll, quality = scored([math.log(10.0 + spec.policy.compress_every)] * (spec.data.n_tokens - 1))
        result = {"kind": "run", "slot": slot, "config_hash": spec.config_hash(), "spec": spec.to_dict(),
                  "fingerprint": self.fingerprint, "engines": {"perplexity": spec.engine, "timing": "decode"},
                  "metrics": {**quality, "tpot_ms": 1.0, "ttft_ms": 2.0}}
        repeats = [{"tpot_ms": 1.0}] * spec.measure.repeat_runs
        path = self.store.write(result, nll=nll, cache_len=[1, 2], repeats=repeats, path=output)
        self.computed.append(slot)
        if self.announce:
            print(f"computed {slot}", flush=True)
        return path


def tables_spec(long: tables.Dataset, short: tables.Dataset, *, lazy_r: int, ablations=(), sweeps=None,
                **fields) -> tables.TablesSpec:
    """A TablesSpec shaped as streamkv.reports.tables_spec builds it from a plan, for the renderer tests.
    ablations: (label, display) pairs; sweeps: {knob: values}."""
    def base(d):
        return tables.Line(plans.BASELINE_DISPLAY, f"baselines/{d.name}")

    main = tuple(tables.Block(d.display, base(d), (tables.Line("Start+Recent (R = 1)", f"main/{d.name}/strict"),
                                                   tables.Line(f"Lazy Pruning (R = {lazy_r})", f"main/{d.name}/lazy")))
                 for d in (long, short))
    ladder = tables.Block(None, base(long), tuple(tables.Line(display, f"ablations/{long.name}/{label}")
                                                  for label, display in ablations)) if ablations else None
    swept = tuple(tables.Block(SWEEP_SYMBOLS[knob], base(long), tuple(
        tables.Line(f"{SWEEP_SYMBOLS[knob]} = {v}", f"sweeps/{long.name}/{knob}={v}", v) for v in values), knob)
        for knob, values in (sweeps or {}).items())
    rows = {"main": main, "sweeps": swept, **({"ablations": ladder} if ladder else {})}
    return tables.TablesSpec(long=long, short=short, lazy_r=lazy_r, rows=rows, **fields)


def pytest_configure(config):
    """ATEN_CPU_CAPABILITY selects the kernels the numerics run on (Makefile: test-default-kernels); torch
    ignores a value it cannot honour with a warning only, so the suite refuses to run on other kernels."""
    asked = os.environ.get("ATEN_CPU_CAPABILITY")
    running = torch.backends.cpu.get_cpu_capability()
    if asked and asked.upper() != running:
        raise pytest.UsageError(f"ATEN_CPU_CAPABILITY={asked} asked, but torch runs {running} kernels")


def pytest_report_header(config):
    return (f"torch {torch.__version__}: {torch.backends.cpu.get_cpu_capability()} CPU kernels, "
            f"{torch.get_num_threads()} threads")


@pytest.fixture(autouse=True)
def isolated_root(tmp_path, monkeypatch):
    """The repository root the commands resolve .env, results/ and NeurIPS/ against: a fresh directory, so
    no test reads the checkout's .env or writes into its results/."""
    monkeypatch.setattr(settings_mod, "ROOT", tmp_path)
    # A Runner points Inductor's cache into its results directory (streamkv/compile_cache.py) through the
    # environment; recorded here so that it is restored after each test, not left pointing at a tmp_path.
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """(profile, settings factory) for stage tests, with results under tmp_path/results."""
    install_fakes(monkeypatch)
    profile = fake_profile(tmp_path)

    def settings(**knobs) -> Settings:
        return Settings(results_dir=str(tmp_path / "results"), **knobs)

    return profile, settings


@pytest.fixture
def invoke(tmp_path, monkeypatch):
    """Run the CLI in tmp_path (its .env, its results/), with no knob inherited from the environment."""
    monkeypatch.chdir(tmp_path)
    for knob in cli.settings_mod.KNOBS:
        monkeypatch.delenv(knob, raising=False)

    def call(*args, env=None):
        return CliRunner().invoke(cli.main, list(args), env=env or {})

    return call


def assert_one_line_error(result, message: str, tmp_path: Path) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamkv: error: ") and message in lines[0], result.stderr
    assert not list(tmp_path.rglob("*.json")) or all("streams" in p.parts for p in tmp_path.rglob("*.json"))


@pytest.fixture
def faked(tmp_path, monkeypatch):
    """The CLI on the fake profile, with the fake runner in place of the real one."""
    install_fakes(monkeypatch)
    profile = fake_profile(tmp_path)
    # CAP_TOTAL / --cap-total applies, as profiles.resolve applies it
    monkeypatch.setattr(profiles, "resolve",
                        lambda settings: dataclasses.replace(profile, cap_total=settings.cap_total or profile.cap_total))
    made = []

    def runner(store, **kw):
        made.append(FakeRunner(store))
        return made[-1]

    monkeypatch.setattr(runner_mod, "Runner", runner)
    return made


def worker_main(tmp: str, delay: str) -> None:
    """Run every stage of the fake profile with a slow fake engine (the kill -9 test's victim)."""
    class Patch:  # the tiny part of pytest's monkeypatch that install_fakes uses
        setattr = staticmethod(setattr)

    install_fakes(Patch())
    profile = fake_profile(Path(tmp))
    settings = Settings(results_dir=str(Path(tmp) / "results"))
    ctx = context.context(settings, tokenize=True, profile=profile)
    points = plans.plan(ctx, plans.paper_stages(settings))
    stages.execute(ctx, points, runner=FakeRunner(ctx.store, delay=float(delay), announce=True))


if __name__ == "__main__":
    worker_main(*sys.argv[1:])
