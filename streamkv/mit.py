"""The MIT reference stage: mit-han-lab/streaming-llm's own perplexity script, run beside our numbers.

When MIT_REPO points at a checkout of https://github.com/mit-han-lab/streaming-llm, its
`examples/eval_long_ppl.py` runs in a subprocess (PYTHON_BIN, default this interpreter) with the knobs of
our Start+Recent run, and its perplexity is recorded with our fingerprint:
  results/mit_bench/{dataset}_mit_reference.json              start_size = S, recent_size = strict's window
  results/mit_bench/{dataset}_mit_reference_windowmatch.json  same S, recent_size = Lazy Pruning's window
(the guide's window-matched variant: it isolates the "recent window got smaller" confound when Lazy
Pruning spends part of the budget on slack). Nothing of MIT's code is vendored: we only call the script.

The script's interface (upstream examples/eval_long_ppl.py + streaming_llm/utils.py:parse_args):
  --model_name_or_path --dataset_name --task --split {validation,test} --num_samples --output_dir
  --enable_start_recent_kv_cache --start_size --recent_size --enable_pos_shift --num_eval_tokens
It feeds the text one token per forward from an empty cache, applies StartRecentKVCache (keep the first
start_size and the last recent_size entries once the cache exceeds their sum: our strict R = 1 rule),
appends each token's NLL to {output_dir}/log.txt, and writes exp(mean NLL) to {output_dir}/ppl.txt
(also the last line of its stdout). Upstream reads the text with datasets.load_dataset(name, task, split)
and scores rows from the first one on. Its cache-dimension switch (as of upstream commit fee538a) looks
for "pythia" in model_type, which is "gpt_neox" for Pythia: with --enable_start_recent_kv_cache upstream
itself stops with "ValueError: got gpt_neox" on the paper's model, and the stage reports that failure.
The seed's offline copy ("mit-streaming-llm") accepts gpt_neox and adds --data-json (a JSON file with a
"text" key: exactly our stream files), --max-eval-tokens and --output-json; when the checkout's script
declares --data-json we pass our stream file, so both sides score the same tokens.

A reference that cannot run is skipped with one line (MIT_REPO unset or not a checkout, a dataset the
script cannot read). A script that fails leaves no JSON: one line with its exit code, and the tails of its
stdout/stderr in results/mit_bench/{dataset}_{label}.log.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import click

from . import assets, fingerprint, profiles, settings as settings_mod
from .profiles import Dataset, Profile
from .settings import Settings
from .spec import ModelSpec, PolicySpec
from .store import Store, atomic_write, nll_bytes

SCRIPT = "examples/eval_long_ppl.py"
PACKAGE = "streaming_llm"     # with SCRIPT, the code the numbers depend on: its sha256 is in the config hash
# Upstream can only read hub datasets; these are the hub names of ours (the paper's WikiText sample comes
# from wikitext-103, PG19's from the test split; datasets >= 4 refuses pg19's loading script, and the run
# then fails with that message). Other datasets (the demo's) have no hub counterpart.
HUB_DATASETS = {"pg19": ("pg19", "default", "test"), "wikitext": ("wikitext", "wikitext-103-raw-v1", "test")}
# Upstream stops after --num_samples rows or --num_eval_tokens tokens; rows are lines (wikitext) or books
# (pg19), so it gets every row and --num_eval_tokens alone decides where it stops.
ALL_ROWS = 10**9
LOG_TAIL_LINES = 200


class MitSkip(Exception):
    """A reference that cannot run here; the stage prints the reason as one line and goes on."""


@dataclass(frozen=True)
class Reference:
    label: str            # mit_reference | mit_reference_windowmatch
    start_size: int
    recent_size: int


def references(strict: PolicySpec, lazy: PolicySpec) -> tuple[Reference, Reference]:
    """Start+Recent as MIT's cache sizes it: after each token MIT keeps start_size + recent_size entries,
    which is our strict cache after a prune (S sinks + a recent run of W + O tokens). The window-matched
    variant keeps S and takes Lazy Pruning's recent run instead: its auto-capped window, which shrinks
    by every slack σ (and refresh budget B) it spends out of CAP_TOTAL."""
    return (Reference("mit_reference", strict.n_sink, strict.window + strict.overlap),
            Reference("mit_reference_windowmatch", strict.n_sink, lazy.window + lazy.overlap))


def checkout(mit_repo: str | None) -> Path:
    if not mit_repo:
        raise MitSkip("MIT_REPO is not set (point it at a checkout of mit-han-lab/streaming-llm)")
    repo = Path(mit_repo).expanduser().resolve()
    missing = [p for p in (SCRIPT, f"{PACKAGE}/kv_cache.py") if not (repo / p).is_file()]
    if missing:
        raise MitSkip(f"MIT_REPO={mit_repo} is not a streaming-llm checkout (no {', '.join(missing)})")
    return repo


def code_sha256(repo: Path) -> str:
    """One digest over the script and the streaming_llm package (path + content, in path order)."""
    files = [repo / SCRIPT] + sorted((repo / PACKAGE).rglob("*.py"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(repo).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def model_path(model: ModelSpec) -> str:
    """A local directory for --model_name_or_path, so the script loads our pinned weights offline:
    upstream's load() calls from_pretrained(name) and ignores its own --revision."""
    local = Path(model.name) if Path(model.name).is_absolute() else assets.REPO / model.name
    if not local.is_dir():
        import huggingface_hub

        try:
            local = Path(huggingface_hub.snapshot_download(model.name, revision=model.revision,
                                                           local_files_only=True))
        except OSError:
            raise assets.AssetError(f"model {model.name}@{model.revision} is not in the local Hugging Face "
                                    f"cache; {assets.FETCH_HINT}") from None
    # Upstream loads with trust_remote_code=True: refuse a checkpoint that would run code of its own.
    assets.refuse_remote_code(local, model.name)
    return str(local)


def _declares(script_text: str, flag: str) -> bool:
    return re.search(rf"""["']{re.escape(flag)}["']""", script_text) is not None


@dataclass(frozen=True)
class Invocation:
    spec: dict                 # what the numbers depend on; hashed into config_hash
    args: list[str]            # the script's arguments, without --output_dir / --output-json
    limitations: list[str]
    output_json: bool          # the script writes its own metrics JSON (the seed's copy)


def invocation(repo: Path, dataset: Dataset, model_dir: str, model: ModelSpec, ref: Reference, pos_shift: bool,
               code: str) -> Invocation:
    script = (repo / SCRIPT).read_text(encoding="utf-8", errors="replace")
    n_tokens = dataset.max_tokens                       # our runs score n_tokens − 1 predictions
    args = ["--model_name_or_path", model_dir]
    limitations = [
        "Scores one token per forward from an empty cache (no prefill forward); the loss is "
        "torch.nn.CrossEntropyLoss on the model's fp16 logits (ours: fp32 log-softmax, fp64 sums).",
        "streaming_llm.utils.load() loads the model in float16 with device_map='auto' whatever our dtype, "
        "and the script's device is hard-coded to 'cuda'.",
    ]
    if _declares(script, "--data-json"):
        stream = assets.REPO / dataset.path
        if not stream.is_file():
            raise MitSkip(f"stream file {stream} is missing; {assets.FETCH_HINT}")
        data = {"source": "stream", "name": dataset.name, "path": dataset.path,
                "file_sha256": assets.sha256_file(stream), "max_eval_tokens": n_tokens}
        args += ["--dataset_name", dataset.name, "--data-json", str(stream), "--max-eval-tokens", str(n_tokens)]
    elif dataset.name in HUB_DATASETS:
        name, task, split = HUB_DATASETS[dataset.name]
        data = {"source": "hub", "dataset_name": name, "task": task, "split": split}
        args += ["--dataset_name", name, "--task", task, "--split", split, "--num_samples", str(ALL_ROWS)]
        limitations.append(
            f"Reads {name}/{task} ({split}) from the hub (or the datasets cache) with datasets.load_dataset and "
            f"scores its rows from the first one on, not our pinned sample {dataset.path}: the text differs "
            "from our runs', so the PPL is not comparable to our table.")
    else:
        raise MitSkip(f"the checkout's {SCRIPT} reads only hub datasets (no --data-json) and {dataset.name} "
                      "has none")
    args += ["--num_eval_tokens", str(n_tokens - 1),
             "--enable_start_recent_kv_cache", "--start_size", str(ref.start_size),
             "--recent_size", str(ref.recent_size)]
    if pos_shift:
        args.append("--enable_pos_shift")
        limitations.append(
            "--enable_pos_shift replaces GPT-NeoX/Llama attention forwards with versions written for "
            "transformers 4.33 (streaming_llm/pos_shift/); with newer transformers they can crash or silently "
            "give wrong PPL for Pythia (GPT-NeoX). Do not put these numbers in the main table unless verified "
            "in this environment (see mit.python_packages).")
    spec = {"script": SCRIPT, "code_sha256": code, "model": {"name": model.name, "revision": model.revision},
            "data": data, "start_size": ref.start_size, "recent_size": ref.recent_size,
            "enable_pos_shift": pos_shift, "num_eval_tokens": n_tokens - 1}
    return Invocation(spec, args, limitations, _declares(script, "--output-json"))


def config_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- running
def _python_packages(python: str) -> dict:
    """Versions the MIT interpreter sees: its transformers decides whether pos-shift can work."""
    code = ("import json, importlib.metadata as m\n"
            "def v(p):\n"
            "    try: return m.version(p)\n"
            "    except m.PackageNotFoundError: return None\n"
            "print(json.dumps({p: v(p) for p in ('torch', 'transformers', 'datasets')}))")
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=True)
        return json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}


def _git_commit(repo: Path) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _tail(path: Path) -> list[str]:
    # tqdm redraws with carriage returns: each redraw counts as a line.
    lines = [s for s in re.split(r"[\r\n]+", path.read_text(encoding="utf-8", errors="replace")) if s.strip()]
    return lines[-LOG_TAIL_LINES:]


def _write_log(path: Path, command: list[str], rc: int, out_dir: Path) -> list[str]:
    """The run's log beside the results; returns the stderr tail."""
    stderr = _tail(out_dir / "stderr.txt")
    text = "\n".join([f"$ {' '.join(command)}", f"exit code: {rc}",
                      f"--- stdout (last {LOG_TAIL_LINES} lines) ---", *_tail(out_dir / "stdout.txt"),
                      f"--- stderr (last {LOG_TAIL_LINES} lines) ---", *stderr, ""])
    atomic_write(path, text.encode())
    return stderr


def _read_outputs(out_dir: Path) -> tuple[float, list[float], dict | None]:
    """(ppl.txt, log.txt's per-token NLL, the --output-json metrics if written); ValueError if unusable."""
    reported = out_dir / "metrics.json"
    try:
        ppl = float((out_dir / "ppl.txt").read_text().split()[0])
        nll = [float(line) for line in (out_dir / "log.txt").read_text().split()]
        metrics = json.loads(reported.read_text())["metrics"] if reported.is_file() else None
    except (OSError, IndexError, KeyError, ValueError) as e:
        raise ValueError(f"exit 0 but unusable outputs in its --output_dir ({type(e).__name__}: {e})") from None
    if not nll:
        raise ValueError("exit 0 but log.txt holds no token NLL")
    return ppl, nll, metrics


class MitFailure(RuntimeError):
    """The MIT script failed; the message is the stage's one line."""


def run_reference(store: Store, slot: str, repo: Path, python: str, inv: Invocation, *,
                  matches: dict, packages: dict, fp: dict, expected_predictions: int) -> Path:
    """Run the script once and write the slot's JSON; MitFailure (and no JSON) when it fails."""
    path = store.path(slot)
    log = path.with_suffix(".log")
    # A JSON must never outlive the run it describes: drop the old one before the new run can fail.
    path.unlink(missing_ok=True)
    # The script's --output_dir lives outside results/: a run killed half-way leaves nothing there that
    # a scan of results/ could mistake for a result.
    with tempfile.TemporaryDirectory(prefix=f"streamkv-{path.stem}.") as tmp:
        out_dir = Path(tmp)
        command = [python, SCRIPT, *inv.args, "--output_dir", str(out_dir)]
        if inv.output_json:
            command += ["--output-json", str(out_dir / "metrics.json")]
        # Upstream installs streaming_llm with `setup.py develop`; the checkout on the path does the same.
        # No network at run time: MIT's script calls load_dataset / from_pretrained, which would download.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
        with open(out_dir / "stdout.txt", "wb") as so, open(out_dir / "stderr.txt", "wb") as se:
            rc = subprocess.run(command, cwd=repo, env=env, stdout=so, stderr=se).returncode
        stderr = _write_log(log, command, rc, out_dir)
        if rc != 0:
            last = stderr[-1].strip() if stderr else "no stderr"
            raise MitFailure(f"{slot}: {SCRIPT} failed with exit code {rc} ({last}); "
                             f"stdout/stderr tails in {log}")
        try:
            ppl, nll, reported = _read_outputs(out_dir)
        except ValueError as e:
            raise MitFailure(f"{slot}: {SCRIPT} {e}; log in {log}") from None
    nll_sum = math.fsum(nll)
    limitations = list(inv.limitations)
    if len(nll) != expected_predictions:
        limitations.append(f"It scored {len(nll)} tokens; our runs on this dataset score {expected_predictions}.")
    result = {
        "kind": "mit_reference",
        "slot": slot,
        "config_hash": config_hash(inv.spec),
        "spec": inv.spec,
        "fingerprint": fp,
        "metrics": {"perplexity": ppl, "nll_sum": nll_sum, "n_predicted_tokens": len(nll),
                    # exp(mean) of the logged NLLs in fp64: agrees with MIT's own number to its fp16 rounding
                    "perplexity_from_log": math.exp(nll_sum / len(nll)),
                    **({"mit_reported": reported} if reported else {})},
        "mit": {"repository": str(repo), "commit": _git_commit(repo), "python": python,
                "python_packages": packages, "command": command[1:], "matches": matches},
        "limitations": limitations,
        # The guide: MIT numbers stay out of the main table unless verified in this environment.
        "use_in_main_table": False,
        "artifacts": {"log": log.name},
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return store.write(result, nll=nll_bytes(nll))


def _say(message: str) -> None:
    click.echo(f"mit-reference: {message}", err=True)


def run_mit_reference(settings: Settings, *, profile: Profile | None = None) -> int:
    """Both references on every dataset of the profile; returns the number of failed runs."""
    try:
        repo = checkout(settings.mit_repo)
    except MitSkip as skip:
        _say(f"skipped: {skip}")
        return 0
    profile = profile or profiles.resolve(settings)
    store = Store(settings.results_dir)
    strict_v, lazy_v = profile.main_variants()
    strict, lazy = profile.policy(strict_v), profile.policy(lazy_v)
    python = settings.python_bin
    model_dir = model_path(profile.model)
    code = code_sha256(repo)
    packages = _python_packages(python)
    # Our `cache` position mode is StreamingLLM's pos-shift (a token's position is its cache slot).
    pos_shift = strict_v.position_mode == "cache"
    fp = None
    failures = 0
    for dataset in profile.datasets:
        # Where the sizes come from, the same in both files (a copied file must not contradict itself).
        matches = {"start_size": {f"main/{dataset.name}/strict": strict.n_sink},
                   "recent_size": {f"main/{dataset.name}/{v.label}": p.window + p.overlap
                                   for v, p in ((strict_v, strict), (lazy_v, lazy))}}
        done: dict[str, str] = {}    # config_hash -> slot written in this run, for the equal-spec copy
        for ref in references(strict, lazy):
            slot = f"mit_bench/{dataset.name}_{ref.label}"
            try:
                inv = invocation(repo, dataset, model_dir, profile.model, ref, pos_shift, code)
            except MitSkip as skip:
                _say(f"{slot}: skipped: {skip}")
                continue
            h = config_hash(inv.spec)
            cell = None if settings.force else store.lookup(slot, h, settings.allow_stale_results)
            if cell is not None:
                _say(f"{slot}: {'stale, kept (ALLOW_STALE_RESULTS=1)' if cell.stale else 'reused'} ({cell.path})")
                if not cell.stale:
                    done[h] = slot
                continue
            if h in done:
                # σ = 0 leaves Lazy Pruning the strict window: the window-matched run would repeat this one.
                _say(f"{slot}: same arguments as {done[h]} (equal recent windows); copied")
                store.copy(store.path(done[h]), slot)
                continue
            fp = fp or fingerprint.collect()
            _say(f"{slot}: running {SCRIPT} (start_size={ref.start_size}, recent_size={ref.recent_size}, "
                 f"{inv.spec['num_eval_tokens']} tokens)")
            try:
                # The slot's lock covers the log as well as the JSON: Store.sweep never takes its temp files.
                with store.lock(store.path(slot)):
                    path = run_reference(store, slot, repo, python, inv, matches=matches, packages=packages,
                                         fp=fp, expected_predictions=dataset.max_tokens - 1)
            except MitFailure as failure:
                _say(str(failure))
                failures += 1
                continue
            done[h] = slot
            _say(f"{slot}: PPL {store.read(path)['metrics']['perplexity']:.3f} -> {path}")
    return failures


@click.command("mit-reference")
@click.option("--profile", default=None, help="demo | paper  [env STREAMKV_PROFILE, default demo]")
@click.option("-f", "--force", is_flag=True, default=None,
              help="Re-run even when a current result exists  [env FORCE]")
@click.option("--results-dir", default=None, help="[env RESULTS_DIR, default results]")
@click.option("--mit-repo", default=None, help="Checkout of mit-han-lab/streaming-llm  [env MIT_REPO]")
@click.option("--python-bin", default=None,
              help="Interpreter that runs MIT's script  [env PYTHON_BIN, default this one]")
def mit_reference_command(**flags) -> None:
    """MIT streaming-llm's eval_long_ppl.py with our Start+Recent sizes (+ the window-matched variant)."""
    settings = settings_mod.load(overrides=flags)
    settings_mod.export_hf_home(settings)
    if run_mit_reference(settings):
        sys.exit(1)
