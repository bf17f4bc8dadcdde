"""`streamkv`: the click group of every stage (entry point `streamkv = streamkv.cli:main`).

Knobs come from the environment and `.env` (streamkv.settings); the flags of a command win over both.
Any error a user can fix (a bad knob, a missing asset, a stage that cannot proceed) ends the command with
one line on stderr, `streamkv: error: ...`, and exit code 2, before any result JSON is written.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

import click
from tabulate import tabulate

from . import (assets, context, experiments, fingerprint, plans, policies, profiles, reports,
               settings as settings_mod, stages)
from .assets import AssetError
from .confined import kind
from .fetch import FetchError, fetch_command
from .verify import verify_assets_command
from .paper import PaperError, build_pdf, pdf_command
from .settings import SettingsError
from .policies import PolicySpec
from .runspec import RunSpec
from .spec import MeasureSpec, SpecError
from .store import StoreError

USER_ERRORS = (SpecError, SettingsError, AssetError, FetchError, PaperError, StoreError, context.StageError)
GENERATED = "NeurIPS/generated"   # under the repository root unless --out-dir says otherwise
PROFILE_NAMES = " | ".join(profiles.PROFILES)   # the --profile help of every command


class _Group(click.Group):
    """The click group; a stage's command comes from the stage registry (streamkv/experiments) when asked
    for, so a stage registered there has its command, whoever registered it."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | {s.command for s in experiments.STAGES})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        stage = next((s for s in experiments.STAGES if s.command == name), None)
        return _stage_command(stage) if stage is not None else super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as err:
            _fail(ctx, str(err))
        except click.BadParameter as err:   # an option's type or range (e.g. --max-eval-tokens 0)
            _fail(ctx, err.format_message())
        except OSError as err:
            # A file the command had to read or write (a full disk, a read-only or missing directory): the
            # modules turn the ones they expect into their own errors; this names the file for any other.
            where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
            _fail(ctx, f"{where + ': ' if where else ''}{err.strerror or err}")


def _fail(ctx: click.Context, message: str) -> None:
    click.echo(f"streamkv: error: {' '.join(message.split())}", err=True)
    ctx.exit(2)


@click.group(cls=_Group)
def main() -> None:
    """Reproducible KV-cache eviction experiments: StreamingLLM Start+Recent vs Lazy Pruning."""


def _knob_options(f):
    """Flags shared by the stage commands; each overrides its environment / .env knob."""
    options = [
        click.option("--profile", default=None, help=f"{PROFILE_NAMES}  [env STREAMKV_PROFILE, default demo]"),
        click.option("-f", "--force", is_flag=True, default=None,
                     help="Recompute every point, the baseline included  [env FORCE]"),
        click.option("--results-dir", default=None, help="[env RESULTS_DIR, default results]"),
        click.option("--cap-total", type=int, default=None, help="KV budget C of auto-cap  [env CAP_TOTAL]"),
        click.option("--warmup-runs", type=int, default=None, help="[env WARMUP_RUNS, default 1]"),
        click.option("--repeat-runs", type=int, default=None, help="[env REPEAT_RUNS, default 3]"),
        click.option("--executor", default=None, help="local | slurm  [env STREAMKV_EXECUTOR, default local]"),
        click.option("--workers", type=int, default=None,
                     help="Worker processes (local) or array tasks (slurm)  [env STREAMKV_WORKERS, default: "
                          "one per GPU; slurm: one per point]"),
        click.option("--gpus", default=None, help="all | 0,1,3: one local worker pinned to each  [env STREAMKV_GPUS]"),
        click.option("--retries", type=int, default=None,
                     help="Resubmissions of points whose worker died  [env STREAMKV_RETRIES, default 1]"),
        click.option("--slurm-partition", default=None, help="[env STREAMKV_SLURM_PARTITION]"),
        click.option("--slurm-time", type=int, default=None,
                     help="Minutes per array task  [env STREAMKV_SLURM_TIME, default 240]"),
        click.option("--slurm-gpus-per-task", type=int, default=None, help="[env STREAMKV_SLURM_GPUS_PER_TASK, default 0]"),
        click.option("--slurm-account", default=None, help="[env STREAMKV_SLURM_ACCOUNT]"),
        click.option("--slurm-python", default=None,
                     help="How array tasks start Python, e.g. 'apptainer exec --nv streamkv.sif python'  "
                          "[env STREAMKV_SLURM_PYTHON, default: this Python]"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _settings(**flags) -> settings_mod.Settings:
    loaded = settings_mod.load(overrides=flags)
    settings_mod.export_hf_home(loaded)
    return loaded


def _stage_command(stage: experiments.Stage) -> click.Command:
    """The stage's command: the knobs every stage takes, then its own options (Stage.options), each a
    Settings field, --random-weights (timing-only weights) or an option of its plan (the baseline's --runs).
    Exit 1 when a point's run failed (MIT's script), after the others were computed."""
    def command(random_weights: bool = False, **flags) -> None:
        fields = {f.name for f in dataclasses.fields(settings_mod.Settings)}
        options = {k: v for k, v in flags.items() if k not in fields}
        s = _settings(**{k: v for k, v in flags.items() if k in fields})
        if stages.run_stages(s, [stage.name], random_weights=random_weights, **options).failed:
            sys.exit(1)

    for option in reversed(stage.options):
        command = option(command)
    return click.command(stage.command, help=stage.help)(_knob_options(command))


@main.command()
@_knob_options
@click.option("--random-weights", is_flag=True,
              help="Refused: the paper's perplexities need the real weights (timing only: --profile paper-random).")
@click.option("--pdf/--no-pdf", default=True, help="Build the PDF afterwards when latexmk exists.")
def paper(random_weights: bool, pdf: bool, **flags) -> None:
    """Every stage (RUN_ABLATIONS / RUN_SWEEPS switch some off, RUN_MIT_REFERENCE / RUN_MIT_BENCH add
    the optional ones), the tables, then the PDF."""
    if random_weights:
        raise SpecError("the paper stage refuses --random-weights: its perplexities would be meaningless; "
                        "--profile paper-random runs every stage on random weights, its PDF marked timing only")
    s = _settings(**flags)
    # A failed MIT reference (an optional sanity check) is reported by the stage and does not stop the paper.
    stages.run_stages(s, plans.paper_stages(s))
    _write_tables(s, settings_mod.under_root(GENERATED))
    if pdf and shutil.which("latexmk"):
        click.echo(build_pdf())
    elif pdf:
        click.echo("pdf: skipped, latexmk not found (`make pdf` installs TeX Live)", err=True)


def _write_tables(s: settings_mod.Settings, out_dir: Path) -> None:
    report = reports.write_tables(s, out_dir)
    click.echo(report.text)
    click.echo(f"wrote {', '.join(str(p) for p in report.written)}", err=True)
    for slot in report.stale:
        state = "shown, marked †" if s.allow_stale_results else "not shown (ALLOW_STALE_RESULTS=0)"
        click.echo(f"stale result: {slot} ({state}): {report.why_stale.get(slot, '?')}", err=True)
    for problem in report.problems:
        click.echo(f"skipped: {problem}", err=True)


@main.command()
@click.option("--profile", default=None, help=f"{PROFILE_NAMES}  [env STREAMKV_PROFILE]")
@click.option("--results-dir", default=None, help="[env RESULTS_DIR, default results]")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"[default: {GENERATED} in the repository]")
def tables(profile: str | None, results_dir: str | None, out_dir: Path | None) -> None:
    """Rewrite NeurIPS/generated/*.tex from results/ and print the tables (never loads a model)."""
    _write_tables(_settings(profile=profile, results_dir=results_dir), out_dir or settings_mod.under_root(GENERATED))


@click.command()
@click.option("--profile", default=None, help=f"{PROFILE_NAMES}  [env STREAMKV_PROFILE]")
@click.option("--results-dir", default=None, help="[env RESULTS_DIR, default results]")
def status(profile: str | None, results_dir: str | None) -> None:
    """Every planned point: current, missing, stale, or unknown (stream never tokenized here)."""
    rows, problems = reports.status(_settings(profile=profile, results_dir=results_dir))
    click.echo(tabulate(rows, headers=("slot", "state", "engine")))
    for problem in problems:
        click.echo(f"problem: {problem}", err=True)


main.add_command(status)
main.add_command(status, name="ls")


@main.command("fingerprint")
def fingerprint_command() -> None:
    """This machine's environment fingerprint, as results record it."""
    click.echo(json.dumps(fingerprint.collect(), indent=2))


@main.command()
@click.option("--profile", default=None, help=f"{PROFILE_NAMES}  [env STREAMKV_PROFILE]")
@click.option("--dataset", default=None, help="A dataset of the profile  [default: its long one]")
@click.option("--mode", default="streaming", show_default=True, help="baseline | streaming")
@click.option("--policy", "policy_name", default=PolicySpec.NAME, show_default=True,
              help=f"{' | '.join(policies.REGISTRY)}: the eviction policy of a streaming run")
@click.option("--heavy", type=int, default=None,
              help="H, slots kept by score (h2o, tova)  [default: half of what the sinks leave of C]")
@click.option("--n-sink", type=int, default=None, help="S  [default: the profile's; baseline: BASELINE_SINK]")
@click.option("--window-size", type=int, default=None, help="W  [default: auto-cap from --cap-total]")
@click.option("--compress-every", type=int, default=None, help="R, 0 = never prune  [default: the profile's lazy R]")
@click.option("--cache-slack", type=int, default=None, help="σ  [default: the profile's]")
@click.option("--max-drop", type=int, default=None, help="δ  [default: the profile's]")
@click.option("--overlap", type=int, default=0, show_default=True, help="O")
@click.option("--refresh-budget", type=int, default=0, show_default=True, help="B")
@click.option("--refresh-policy", default="none", show_default=True, help="none | uniform | middle")
@click.option("--cap-total", type=int, default=None, help="C  [env CAP_TOTAL, default: the profile's]")
@click.option("--position-mode", default="cache", show_default=True, help="cache | absolute")
@click.option("--rerotation", default="exact", show_default=True, help="exact | composed_fp16")
@click.option("--engine", default=None, help="decode | reference | parallel | fast | periods  [default: as the stages choose]")
@click.option("--dtype", default=None, help="float16 | bfloat16 | float32 | float64  [default: the profile's]")
@click.option("--max-eval-tokens", type=click.IntRange(min=2), default=None,
              help="At least 2  [default: the dataset's evaluation length]")
@click.option("--random-weights", is_flag=True, help="Timing only: weights drawn from a fixed seed (recorded).")
@click.option("--warmup-runs", type=int, default=None, help="[env WARMUP_RUNS, default 1]")
@click.option("--repeat-runs", type=int, default=None, help="[env REPEAT_RUNS, default 3]")
@click.option("--recompute-batch", type=int, default=None, help="Baseline windows per forward  [env RECOMPUTE_BATCH, default 16]")
@click.option("--results-dir", default=None, help="[env RESULTS_DIR, default results]")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Result JSON path  [default: results/runs/<dataset>/<hash>.json]")
def run(**o) -> None:
    """One evaluation with explicit knobs (always computed, never reused)."""
    s = _settings(profile=o["profile"], cap_total=o["cap_total"], warmup_runs=o["warmup_runs"],
                  repeat_runs=o["repeat_runs"], recompute_batch=o["recompute_batch"], results_dir=o["results_dir"])
    ctx = context.context(s, tokenize=False, random_weights=o["random_weights"])
    p = ctx.profile
    name = p.long.name if o["dataset"] is None else o["dataset"]   # --dataset '' is refused, not the default
    # Random ids over the model's vocabulary stand in for text only where the weights are random too.
    synthetic = name == profiles.SYNTHETIC and o["random_weights"]
    dataset = p.dataset(name, vocab_size=assets.load_config(ctx.model).vocab_size if synthetic else None)
    if o["max_eval_tokens"] is not None:
        dataset = dataclasses.replace(dataset, max_tokens=o["max_eval_tokens"])
    model = dataclasses.replace(ctx.model, dtype=o["dtype"] or ctx.model.dtype)
    policy = _run_policy(o, p)
    if o["mode"] == "baseline" and o["engine"] not in (None, "recompute"):
        raise SpecError(f"--mode baseline runs the recompute engine only, not --engine {o['engine']}")
    # Validate every knob before the stream is tokenized or a model is loaded; an --engine that cannot
    # realise the point is refused by RunSpec with the engine's own reason.
    draft = RunSpec(model=model, data=None, mode=o["mode"], policy=policy, position_mode=o["position_mode"],
                    rerotation=o["rerotation"], engine="recompute" if o["mode"] == "baseline" else "decode",
                    device=p.device, measure=MeasureSpec(s.warmup_runs, s.repeat_runs),
                    recompute_batch=s.recompute_batch if o["mode"] == "baseline" else 1)
    probe = plans.with_engines(ctx, draft, o["engine"]) if o["mode"] != "baseline" else draft
    if o["output"] is not None:
        _check_writable(o["output"])
    else:
        ctx.store.check_writable()
    data = context.resolve_data(p, dataset, ctx.store, tokenize=True)
    spec = dataclasses.replace(probe, data=data)
    from .runner import Runner  # loads torch and the engines: only once the knobs are known to be valid

    path = Runner(ctx.store, cpu_threads=s.cpu_threads).run(f"runs/{dataset.name}/{spec.config_hash()[:12]}", spec, output=o["output"])
    click.echo(str(path))


def _check_writable(output: Path) -> None:
    """Refuse an --output whose directory cannot be created or written, or that names something other than
    a regular file (a device, a FIFO, a link: never replaced), before anything is computed."""
    if output.is_symlink() or (output.exists() and not output.is_file()):
        raise SpecError(f"--output {output} is a {kind(output.lstat().st_mode)}, not a regular file: a result "
                        "is written only as a regular file")
    parent = output.absolute().parent
    existing = next(d for d in (parent, *parent.parents) if d.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        # access() says yes to root even where nothing can be created (/proc): create a file to know.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise SpecError(f"--output {output} cannot be written ({err})") from None


def _run_policy(o: dict, p):
    policy = _policy_of_flags(o, p)
    if o["window_size"] is not None and o["cap_total"] is not None and policy.cap_total != o["cap_total"]:
        knobs = "S+W+O+B+σ" if isinstance(policy, PolicySpec) else "S+W+H"
        raise SpecError(f"--window-size {o['window_size']} and --cap-total {o['cap_total']} disagree: "
                        f"{knobs} = {policy.cap_total}; give one of them, or values that add up")
    return policy


# The lazy family's own knobs: refused for a score policy rather than silently ignored.
LAZY_ONLY = {"cache_slack": None, "max_drop": None, "overlap": 0, "refresh_budget": 0, "refresh_policy": "none"}


def _policy_of_flags(o: dict, p):
    unit = policies.get(o["policy_name"])
    if o["mode"] == "baseline" and unit is not PolicySpec:
        raise SpecError(f"--policy {o['policy_name']} is for streaming runs: the baseline recomputes, it evicts nothing")
    if unit is not PolicySpec:
        return _scored_policy(o, p, unit)
    if o["heavy"] is not None:
        raise SpecError("--heavy sets the scored slots of h2o / tova, not of --policy lazy")
    if o["mode"] == "baseline":
        if o["n_sink"] is None and o["window_size"] is None:
            return p.baseline_policy()
        sink = p.baseline_sink if o["n_sink"] is None else o["n_sink"]
        return PolicySpec(n_sink=sink, window=p.cap_total - sink if o["window_size"] is None else o["window_size"])
    knobs = dict(n_sink=p.n_sink if o["n_sink"] is None else o["n_sink"],
                 compress_every=p.lazy_r if o["compress_every"] is None else o["compress_every"],
                 cache_slack=p.cache_slack if o["cache_slack"] is None else o["cache_slack"],
                 max_drop=p.max_drop if o["max_drop"] is None else o["max_drop"],
                 overlap=o["overlap"], refresh_budget=o["refresh_budget"], refresh_policy=o["refresh_policy"])
    if o["window_size"] is not None:
        return PolicySpec(window=o["window_size"], **knobs)
    return PolicySpec.auto_cap(p.cap_total, **knobs)


def _scored_policy(o: dict, p, unit):
    given = [f"--{k.replace('_', '-')}" for k, default in LAZY_ONLY.items() if o[k] != default]
    if given:
        raise SpecError(f"{', '.join(given)}: knobs of the lazy policy, not of --policy {unit.NAME}")
    sink = p.n_sink if o["n_sink"] is None else o["n_sink"]
    heavy = (p.cap_total - sink) // 2 if o["heavy"] is None else o["heavy"]
    knobs = dict(n_sink=sink, heavy=heavy, compress_every=p.lazy_r if o["compress_every"] is None else o["compress_every"])
    if o["window_size"] is not None:
        return unit(window=o["window_size"], **knobs)
    return unit.auto_cap(p.cap_total, **knobs)


# Commands owned by their feature modules (docs/ARCHITECTURE.md, "CLI ownership").
for _command in (fetch_command, verify_assets_command, pdf_command):
    main.add_command(_command)
