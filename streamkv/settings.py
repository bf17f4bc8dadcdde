"""Knobs from the environment, `.env` and CLI flags, typed and checked once.

Precedence: CLI flags > environment > `.env` > defaults (the profile's, where a knob has none of its own).

`.env` is read as KEY=VALUE lines, the way the seed guide writes it (`# comments`, optional `export `,
single or double quotes, `$VAR` / `${VAR}` from the environment or earlier lines, so the guide's
`HF_HOME=$PWD/.cache/huggingface` works). It is never run as shell: `$(...)` and backticks are refused
with an error rather than left as text that would look like it worked. Keys we do not know (the guide's
HF_HUB_OFFLINE, ...) are ignored.

Relative paths from the environment, `.env` and the defaults (RESULTS_DIR, `.env` itself) resolve against
the repository root (ROOT), whatever the current directory: `cd NeurIPS && streamkv tables` reads the same
results as `make tex`. A relative path given as a command-line flag is the user's, relative to the current
directory as for any command.

`.env` must be a regular file (a link to one is followed) of at most MAX_DOTENV_BYTES: a directory, FIFO,
device or dangling link is refused rather than ignored, and nothing blocks on it. An error quotes at most
a few dozen characters of any value, and nothing at all from a `.env` reached through a link (it may point
at a file that is not a .env: its lines are not ours to print). A knob set but empty in the environment
while `.env` sets it is refused too: the empty value would hide the file's without a word.

Deliberate change from the seed: ALLOW_STALE_RESULTS defaults to 0. The seed's default 1 reused results
whose parameters had changed and mixed σ=16 and σ=0 rows into one sweep table; here a stale result is
recomputed, or with ALLOW_STALE_RESULTS=1 kept but marked and listed, never used silently.
"""
from __future__ import annotations

import dataclasses
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from . import experiments
from .assets import REPO
from .confined import kind, shown

ROOT = REPO   # the checkout whose .env, results/ and NeurIPS/ the commands use (tests point it elsewhere)
DEFAULT_RESULTS_DIR = "results"
MAX_DOTENV_BYTES = 1 << 20
MAX_VALUE_CHARS = 1 << 16    # after $VAR expansion: lines that double each other must not grow without end
# torch's CPU threads: more than any CPU node has (CPU_THREADS=100000 crashed torch: "can't start new
# thread"). A fixed bound, not this machine's core count: Slurm tasks run on other machines than the one
# that plans them.
MAX_CPU_THREADS = 1024


class SettingsError(ValueError):
    """A knob with a value we cannot use; the CLI prints it as one line."""


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be 0 or 1, got {shown(raw)}")


def _int(name: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {shown(raw)}") from None


def _ints(name: str, raw: str) -> tuple[int, ...]:
    values = tuple(_int(name, part) for part in raw.split())
    if not values:
        raise SettingsError(f"{name} must list at least one integer, got {shown(raw)}")
    return values


def _str(name: str, raw: str) -> str:
    return raw


@dataclass(frozen=True)
class Settings:
    """Every knob of the seed guide. None means "the profile decides" (see streamkv.profiles)."""

    profile: str = "demo"                        # STREAMKV_PROFILE; the container image sets paper
    cap_total: int | None = None                 # CAP_TOTAL: the KV budget C of the auto-cap rule
    # The seed defaulted to 0 warm-up runs and 1 repeat ("get the pipeline through"), which times compilation
    # and scheduler noise; ours is its recommended stable setting (streamkv/timing.py).
    warmup_runs: int = 1
    repeat_runs: int = 3
    # The stages' switches (streamkv/experiments names each Stage.switch; its env knob is the name upper-cased).
    run_sweeps: bool = True
    run_ablations: bool = True
    run_quality_heuristics: bool = False         # Slack/Max_Drop ablations and the σ/δ sweeps
    sweep_r_values: tuple[int, ...] | None = None
    sweep_sigma_values: tuple[int, ...] | None = None
    sweep_delta_values: tuple[int, ...] | None = None
    allow_stale_results: bool = False            # the seed defaulted to 1; see the module docstring
    strict_baseline_check: bool = False          # fingerprint mismatch on a reused baseline: re-run it
    auto_baseline: bool = True                   # generate a missing baseline instead of failing
    run_mit_reference: bool = False
    # The seed defaulted to 0; the bench now carries the engine comparison the paper discusses.
    run_mit_bench: bool = True
    mit_bench_gen_tokens: int = 512
    mit_repo: str | None = None                  # a checkout of mit-han-lab/streaming-llm
    baseline_sink: int | None = None             # the baseline records S/W only to state its cap
    baseline_window: int | None = None
    model_name: str | None = None
    python_bin: str = sys.executable             # the interpreter that runs MIT's scripts
    hf_home: str | None = None
    pg19_sample_file: str | None = None
    pg19_sample_length: int | None = None
    wikitext_sample_length: int | None = None
    force: bool = False                          # recompute every point (and the baseline)
    # torch's CPU threads, set explicitly and recorded in every result's fingerprint: under load, torch's
    # default (one per core) made a tiny model's decode 8-40x slower through threads spinning on each other.
    cpu_threads: int = 1
    # Windows per forward of the recompute baseline (RunSpec.recompute_batch; memory per window in
    # streamkv/engines/recompute.py: 16 windows of Pythia-2.8B at C = 2048 in fp16 take ~1.8 GB).
    recompute_batch: int = 16
    results_dir: str = DEFAULT_RESULTS_DIR
    # Where points run (streamkv/executors.py): this host or a Slurm cluster, with how many workers.
    executor: str = "local"
    workers: int | None = None                   # local: one per GPU (1 without --gpus); slurm: one per unit
    gpus: str | None = None                      # local: all | 0,1,3 (one worker pinned to each)
    retries: int = 1                             # resubmissions of points whose worker died
    slurm_partition: str | None = None
    slurm_time: int = 240                        # minutes per array task
    slurm_gpus_per_task: int = 0
    slurm_account: str | None = None
    slurm_python: str | None = None              # the command array tasks run Python with (a container)

    def __post_init__(self) -> None:
        if not self.results_dir.strip():
            raise SettingsError("RESULTS_DIR / --results-dir is empty: name a directory")
        at_least = {"cap_total": 1, "warmup_runs": 0, "repeat_runs": 1, "mit_bench_gen_tokens": 1, "cpu_threads": 1, "recompute_batch": 1,
                    "baseline_sink": 0, "baseline_window": 1, "pg19_sample_length": 1,
                    "wikitext_sample_length": 1, "workers": 1, "retries": 0, "slurm_time": 1,
                    "slurm_gpus_per_task": 0}
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise SettingsError(f"{_ENV_OF[name]} must be >= {low}, got {value}")
        if self.cpu_threads > MAX_CPU_THREADS:
            raise SettingsError(f"CPU_THREADS must be <= {MAX_CPU_THREADS}, got {shown(str(self.cpu_threads))}")
        # Slurm's own knobs mean nothing to local workers: refused, never silently ignored.
        slurm_only = [f"--{name.replace('_', '-')} / {_ENV_OF[name]}" for name in
                      ("slurm_partition", "slurm_account", "slurm_python") if getattr(self, name) is not None]
        slurm_only += ["--slurm-gpus-per-task / STREAMKV_SLURM_GPUS_PER_TASK"] if self.slurm_gpus_per_task else []
        if self.executor == "local" and slurm_only:
            raise SettingsError(f"{', '.join(slurm_only)} only configure Slurm array tasks; with the local executor "
                                "they would be ignored: add --executor slurm, or drop them")
        for name in ("sweep_r_values", "sweep_sigma_values", "sweep_delta_values"):
            values = getattr(self, name)
            if values is not None and min(values) < 0:
                raise SettingsError(f"{_ENV_OF[name]} must be >= 0, got {' '.join(map(str, values))}")


# Environment name -> (Settings field, parser of the raw string).
KNOBS: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "STREAMKV_PROFILE": ("profile", _str),
    "CAP_TOTAL": ("cap_total", _int),
    "WARMUP_RUNS": ("warmup_runs", _int),
    "REPEAT_RUNS": ("repeat_runs", _int),
    "CPU_THREADS": ("cpu_threads", _int),
    "RECOMPUTE_BATCH": ("recompute_batch", _int),
    "RUN_QUALITY_HEURISTICS": ("run_quality_heuristics", _bool),
    "SWEEP_R_VALUES": ("sweep_r_values", _ints),
    "SWEEP_SIGMA_VALUES": ("sweep_sigma_values", _ints),
    "SWEEP_DELTA_VALUES": ("sweep_delta_values", _ints),
    "ALLOW_STALE_RESULTS": ("allow_stale_results", _bool),
    "STRICT_BASELINE_CHECK": ("strict_baseline_check", _bool),
    "AUTO_BASELINE": ("auto_baseline", _bool),
    "MIT_BENCH_GEN_TOKENS": ("mit_bench_gen_tokens", _int),
    "MIT_REPO": ("mit_repo", _str),
    "BASELINE_SINK": ("baseline_sink", _int),
    "BASELINE_WINDOW": ("baseline_window", _int),
    "MODEL_NAME": ("model_name", _str),
    "PYTHON_BIN": ("python_bin", _str),
    "HF_HOME": ("hf_home", _str),
    "PG19_SAMPLE_FILE": ("pg19_sample_file", _str),
    "PG19_SAMPLE_LENGTH": ("pg19_sample_length", _int),
    "WIKITEXT_SAMPLE_LENGTH": ("wikitext_sample_length", _int),
    "FORCE": ("force", _bool),
    "RESULTS_DIR": ("results_dir", _str),
    "STREAMKV_EXECUTOR": ("executor", _str),
    "STREAMKV_WORKERS": ("workers", _int),
    "STREAMKV_GPUS": ("gpus", _str),
    "STREAMKV_RETRIES": ("retries", _int),
    "STREAMKV_SLURM_PARTITION": ("slurm_partition", _str),
    "STREAMKV_SLURM_TIME": ("slurm_time", _int),
    "STREAMKV_SLURM_GPUS_PER_TASK": ("slurm_gpus_per_task", _int),
    "STREAMKV_SLURM_ACCOUNT": ("slurm_account", _str),
    "STREAMKV_SLURM_PYTHON": ("slurm_python", _str),
    # Each stage's switch (streamkv/experiments): RUN_ABLATIONS, RUN_SWEEPS, RUN_MIT_REFERENCE, RUN_MIT_BENCH.
    **{stage.env: (stage.switch, _bool) for stage in experiments.STAGES if stage.switch},
}
_ENV_OF = {field: env for env, (field, _) in KNOBS.items()}

_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def _expand(value: str, scope: Mapping[str, str], where: str) -> str:
    if "$(" in value or "`" in value:
        raise SettingsError(f"{where}: command substitution is not supported (.env is read as KEY=VALUE, "
                            "never run as shell)")

    def substitute(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name in scope:
            return scope[name]
        if name == "PWD":  # a shell always has it; a process started by make or CI may not
            return os.getcwd()
        raise SettingsError(f"{where}: ${name} is not set")

    expanded = _VAR.sub(substitute, value)
    if len(expanded) > MAX_VALUE_CHARS:
        raise SettingsError(f"{where}: the value expands to more than {MAX_VALUE_CHARS} characters")
    return expanded


def _unquote(raw: str, where: str) -> tuple[str, bool]:
    """(value, expand?): single quotes are literal, double quotes and bare values expand $VAR."""
    raw = raw.strip()
    if raw[:1] in ("'", '"'):
        quote = raw[0]
        end = raw.find(quote, 1)
        rest = raw[end + 1:].strip() if end > 0 else None
        if end < 0 or (rest and not rest.startswith("#")):
            raise SettingsError(f"{where}: unbalanced {quote} quote")
        return raw[1:end], quote == '"'
    # As in shell, `#` starts a comment only at the start of a word.
    return re.split(r"\s+#", raw, maxsplit=1)[0].strip(), True


def parse_dotenv(text: str, environ: Mapping[str, str], source: str = ".env", *,
                 quote: bool = True) -> dict[str, str]:
    """KEY=VALUE pairs of a .env file, with `$VAR` taken from `environ` or earlier lines. quote=False: an
    error names the line but quotes nothing of it (a file reached through a link)."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{source} line {number}"
        try:
            match = _LINE.match(stripped)
            if not match:
                raise SettingsError(f"{where}: expected KEY=VALUE, got {shown(stripped)}")
            key, raw = match.groups()
            value, expand = _unquote(raw, where)
            values[key] = _expand(value, {**values, **environ}, where) if expand else value
        except SettingsError:
            if quote:
                raise
            raise SettingsError(f"{where}: not a KEY=VALUE line (not quoted: {source} is a link to another "
                                "file)") from None
    return values


def under_root(path: str | Path) -> Path:
    """A path from the environment, .env or a default: relative ones are relative to ROOT."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def default_results_dir() -> Path:
    return under_root(DEFAULT_RESULTS_DIR)


def _read_dotenv(dotenv: Path) -> str | None:
    """The text of `.env`, None when there is none; SettingsError when it is there but no readable regular
    file of at most MAX_DOTENV_BYTES (never opened if it is a FIFO or device, so nothing blocks)."""
    try:
        os.lstat(dotenv)
    except FileNotFoundError:
        return None
    try:
        mode = os.stat(dotenv).st_mode
        if not stat.S_ISREG(mode):
            raise SettingsError(f"{dotenv} is a {kind(mode)}, not a file of KEY=VALUE lines")
        fd = os.open(dotenv, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise SettingsError(f"{dotenv} is not a regular file")   # swapped since the stat
            data = f.read(MAX_DOTENV_BYTES + 1)
    except FileNotFoundError:
        raise SettingsError(f"{dotenv} is a symbolic link to a missing file ({shown(os.readlink(dotenv))})") from None
    except OSError as err:
        raise SettingsError(f"{dotenv} cannot be read: {err.strerror}") from None
    if len(data) > MAX_DOTENV_BYTES:
        raise SettingsError(f"{dotenv} is larger than {MAX_DOTENV_BYTES >> 20} MiB: not a .env")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SettingsError(f"{dotenv}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") \
            from None


def load(*, environ: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env"),
         overrides: Mapping[str, Any] | None = None) -> Settings:
    """Settings from `.env` (if the file exists; a relative path is under ROOT), then `environ`, then
    `overrides` (Settings field names with typed values, as click hands them over; None means the flag was
    not given)."""
    environ = os.environ if environ is None else environ
    file_values = {}
    dotenv = None if dotenv is None else under_root(dotenv)
    text = None if dotenv is None else _read_dotenv(dotenv)
    linked = text is not None and dotenv.is_symlink()
    if text is not None:
        file_values = parse_dotenv(text, environ, str(dotenv), quote=not linked)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    fields: dict[str, Any] = {}
    for env, (field, parse) in KNOBS.items():
        raw = environ.get(env, file_values.get(env))
        if raw is not None and raw.strip() == "" and field not in flags and (file_values.get(env) or "").strip():
            raise SettingsError(f"{env} is set but empty in the environment, which hides {dotenv}'s {env}: "
                                f"unset it, or give it a value")
        if raw is not None and raw.strip() != "":  # an empty value means "unset", as in the seed script
            try:
                fields[field] = parse(env, raw)
            except SettingsError:
                if not (linked and env not in environ):
                    raise
                raise SettingsError(f"{env} in {dotenv} is not a valid value (not quoted: {dotenv} is a link "
                                    "to another file)") from None
    if "results_dir" not in flags:
        fields["results_dir"] = str(under_root(fields.get("results_dir", DEFAULT_RESULTS_DIR)))
    fields.update(flags)
    unknown = set(fields) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise TypeError(f"not a Settings field: {sorted(unknown)}")
    return Settings(**fields)


def export_hf_home(settings: Settings) -> None:
    """Make HF_HOME from `.env` visible to the Hugging Face libraries, which read only os.environ."""
    if settings.hf_home:
        os.environ["HF_HOME"] = settings.hf_home
