"""The MIT reference points: mit-han-lab/streaming-llm's own perplexity script, planned beside our numbers.

When MIT_REPO points at a checkout of https://github.com/mit-han-lab/streaming-llm, `plan` gives one
point per dataset and reference (a MitSpec: how to call `examples/eval_long_ppl.py` with the knobs of our
Start+Recent run), which streamkv.plans plans and streamkv.stages reuses and lists like every other point;
streamkv.mit_runner runs them. The two references, per dataset:
  results/mit_bench/{dataset}_mit_reference.json              start_size = S, recent_size = strict's window
  results/mit_bench/{dataset}_mit_reference_windowmatch.json  same S, recent_size = Lazy Pruning's window
(the guide's window-matched variant: it isolates the "recent window got smaller" confound when Lazy
Pruning spends part of the budget on slack). Nothing of MIT's code is vendored: we only call the script.
Planning runs none of MIT's code: it hashes the checkout, reads its commit and asks MIT's interpreter for
its package versions (python_packages, provenance).

The script's interface (upstream examples/eval_long_ppl.py + streaming_llm/utils.py:parse_args):
  --model_name_or_path --dataset_name --task --split {validation,test} --num_samples --output_dir
  --enable_start_recent_kv_cache --start_size --recent_size --enable_pos_shift --num_eval_tokens
It feeds the text one token per forward from an empty cache and applies StartRecentKVCache (keep the first
start_size and the last recent_size entries once the cache exceeds their sum: our strict R = 1 rule).
Upstream reads the text with datasets.load_dataset(name, task, split) and scores rows from the first one
on. Its cache-dimension switch (as of upstream commit fee538a) looks for "pythia" in model_type, which is
"gpt_neox" for Pythia: with --enable_start_recent_kv_cache upstream itself stops with "ValueError: got
gpt_neox" on the paper's model, and the stage reports that failure.
The seed's offline copy ("mit-streaming-llm") accepts gpt_neox and adds --data-json (a JSON file with a
"text" key: exactly our stream files), --max-eval-tokens and --output-json; when the checkout's script
declares --data-json we pass our stream file, so both sides score the same tokens.

A reference that cannot run is skipped at planning with one line (MitSkip: MIT_REPO unset or not a
checkout, a dataset the script cannot read).
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import assets
from .console import say
from .profiles import Dataset, Profile
from .settings import Settings
from .spec import NOT_HASHED, ModelSpec, PolicySpec, digest, hashed_fields

SCRIPT = "examples/eval_long_ppl.py"
# Written by scripts/mit/setup.sh into the checkout it prepares: the commit and the sha256 of PATCH_FILE.
PATCH_MARKER = ".streamkv-patch"
PATCH_FILE = "scripts/mit/streaming-llm.patch"
# The transformers release upstream's README pins (and its pos_shift forwards are written against);
# `make mit-env` builds an interpreter with it.
MIT_TRANSFORMERS = "4.33.0"
ARGS_MODULE = "streaming_llm/utils.py"
PACKAGE = "streaming_llm"     # with SCRIPT, the code the numbers depend on: its sha256 is in the config hash
# Upstream can only read hub datasets; these are the hub names of ours (the paper's WikiText sample comes
# from wikitext-103, PG19's from the test split; datasets >= 4 refuses pg19's loading script, and the run
# then fails with that message). Other datasets (the demo's) have no hub counterpart.
HUB_DATASETS = {"pg19": ("pg19", "default", "test"), "wikitext": ("wikitext", "wikitext-103-raw-v1", "test")}
# Upstream stops after --num_samples rows or --num_eval_tokens tokens; rows are lines (wikitext) or books
# (pg19), so it gets every row and --num_eval_tokens alone decides where it stops.
ALL_ROWS = 10**9


class MitSkip(Exception):
    """A reference that cannot run here; the stage prints the reason as one line and goes on."""


@dataclass(frozen=True)
class Reference:
    label: str            # mit_reference | mit_reference_windowmatch
    start_size: int
    recent_size: int
    display: str          # the row label of the appendix table
    ours: str             # the main variant (its label) that the appendix table compares it with


def references(strict: PolicySpec, lazy: PolicySpec) -> tuple[Reference, Reference]:
    """Start+Recent as MIT's cache sizes it: after each token MIT keeps start_size + recent_size entries,
    which is our strict cache after a prune (S sinks + a recent run of W + O tokens). The window-matched
    variant keeps S and takes Lazy Pruning's recent run instead: its auto-capped window, which shrinks
    by every slack σ (and refresh budget B) it spends out of CAP_TOTAL."""
    return (Reference("mit_reference", strict.n_sink, strict.window + strict.overlap, "MIT Start+Recent",
                      "strict"),
            Reference("mit_reference_windowmatch", strict.n_sink, lazy.window + lazy.overlap,
                      "MIT Start+Recent, window-matched", "lazy"))


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
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(repo).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _declares(script_text: str, flag: str) -> bool:
    return re.search(rf"""["']{re.escape(flag)}["']""", script_text) is not None


@dataclass(frozen=True)
class MitSpec:
    """One run of MIT's script. The hashed fields are what its numbers depend on (config_hash); the others
    say how to run it and follow from them."""

    script: str
    code_sha256: str           # code_sha256(): the script and the streaming_llm package, patch included
    packages: dict             # torch / transformers / datasets versions the MIT interpreter sees
    model: dict                # {"name", "revision"}
    options: dict              # {"device", "dtype"} where the (patched) script takes them, else {}
    data: dict                 # our stream file (--data-json) or the hub dataset upstream reads
    start_size: int
    recent_size: int
    enable_pos_shift: bool
    num_eval_tokens: int
    args: tuple[str, ...] = field(default=(), metadata=NOT_HASHED)  # without model path and output dirs
    limitations: tuple[str, ...] = field(default=(), metadata=NOT_HASHED)
    output_json: bool = field(default=False, metadata=NOT_HASHED)    # the script writes its metrics JSON
    expected_predictions: int = field(default=0, metadata=NOT_HASHED)  # what our runs score
    matches: dict = field(default_factory=dict, metadata=NOT_HASHED)  # our slots the sizes come from
    provenance: dict = field(default_factory=dict, metadata=NOT_HASHED)  # provenance(): commit, setup patch

    engine = "mit"             # as `streamkv status` lists it

    def to_dict(self) -> dict:
        return hashed_fields(self)

    def config_hash(self) -> str:
        return digest(self.to_dict())


def invocation(repo: Path, dataset: Dataset, model: ModelSpec, device: str, ref: Reference, pos_shift: bool,
               code: str, packages: dict, matches: dict, origin: dict) -> MitSpec:
    # The script's flags: its own text and streaming_llm/utils.py, where upstream's parse_args lives.
    script = "".join((repo / f).read_text(encoding="utf-8", errors="replace") for f in (SCRIPT, ARGS_MODULE)
                     if (repo / f).is_file())
    n_tokens = dataset.max_tokens                       # our runs score n_tokens − 1 predictions
    args = []
    limitations = [
        "Scores one token per forward from an empty cache (no prefill forward); the loss is "
        "torch.nn.CrossEntropyLoss on the model's logits (ours: fp32 log-softmax, fp64 sums).",
    ]
    # Upstream loads float16 on a hard-coded "cuda"; our setup patch (docker/mit/) adds --device/--dtype so
    # that MIT's code runs the demo's float32 CPU model as we do.
    options = {"device": device, "dtype": model.dtype} if _declares(script, "--device") else {}
    if options:
        args += ["--device", device, "--dtype", model.dtype]
    else:
        limitations.append("streaming_llm.utils.load() loads the model in float16 with device_map='auto' "
                           "whatever our dtype, and the script's device is hard-coded to 'cuda'.")
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
        if packages.get("transformers") != MIT_TRANSFORMERS:
            limitations.append(
                "--enable_pos_shift replaces GPT-NeoX/Llama attention forwards with versions written for "
                f"transformers {MIT_TRANSFORMERS} (streaming_llm/pos_shift/); this interpreter has "
                f"transformers {packages.get('transformers')}, where they can crash or silently give wrong PPL "
                "(`make mit-env` builds the pinned environment).")
    return MitSpec(script=SCRIPT, code_sha256=code, packages=packages,
                   model={"name": model.name, "revision": model.revision}, options=options, data=data,
                   start_size=ref.start_size, recent_size=ref.recent_size, enable_pos_shift=pos_shift,
                   num_eval_tokens=n_tokens - 1, args=tuple(args), limitations=tuple(limitations),
                   output_json=_declares(script, "--output-json"), expected_predictions=n_tokens - 1,
                   matches=matches, provenance=origin)


def python_packages(python: str) -> dict:
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


def provenance(repo: Path) -> dict:
    """Which MIT code ran: the commit and setup patch `make mit-env` recorded (scripts/mit/setup.sh), or
    the commit of a plain git checkout (patch None)."""
    marker = repo / PATCH_MARKER
    if marker.is_file():
        fields = dict(line.split(" ", 1) for line in marker.read_text(encoding="utf-8").splitlines() if " " in line)
        return {"commit": fields.get("commit"), "patch": PATCH_FILE, "patch_sha256": fields.get("patch")}
    try:
        done = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "patch": None}
    return {"commit": done.stdout.strip() or None, "patch": None}


@dataclass(frozen=True)
class Planned:
    slot: str
    spec: MitSpec
    reference: Reference
    dataset: Dataset


def plan(profile: Profile, settings: Settings, main_slot: Callable[[Dataset, str], str]) -> list[Planned]:
    """Both references on every dataset of the profile; [] with one line when MIT_REPO is not a checkout,
    and a dataset the script cannot read is left out with one line. main_slot(dataset, variant label): the
    plan's slot of our main point, which each reference records as where its sizes come from."""
    try:
        repo = checkout(settings.mit_repo)
    except MitSkip as skip:
        say(f"mit-reference: skipped: {skip}")
        return []
    strict_v, lazy_v = profile.main_variants()
    strict, lazy = profile.policy(strict_v), profile.policy(lazy_v)
    code, packages, origin = code_sha256(repo), python_packages(settings.python_bin), provenance(repo)
    # Our `cache` position mode is StreamingLLM's pos-shift (a token's position is its cache slot).
    pos_shift = strict_v.position_mode == "cache"
    points = []
    for dataset in profile.datasets:
        # Where the sizes come from, the same in both files (a copied file must not contradict itself).
        matches = {"start_size": {main_slot(dataset, strict_v.label): strict.n_sink},
                   "recent_size": {main_slot(dataset, v.label): p.window + p.overlap
                                   for v, p in ((strict_v, strict), (lazy_v, lazy))}}
        for ref in references(strict, lazy):
            slot = f"mit_bench/{dataset.name}_{ref.label}"
            try:
                spec = invocation(repo, dataset, profile.model, profile.device, ref, pos_shift, code, packages,
                                  matches, origin)
            except MitSkip as skip:
                say(f"mit-reference: {slot}: skipped: {skip}")
                continue
            points.append(Planned(slot, spec, ref, dataset))
    return points
