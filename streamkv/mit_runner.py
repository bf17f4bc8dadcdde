"""Running the MIT reference points that streamkv.mit plans: streaming-llm's script in a subprocess.

`MitRunner.run` runs `examples/eval_long_ppl.py` of the checkout at MIT_REPO with a MitSpec's arguments, in
a subprocess (PYTHON_BIN, default this interpreter), offline, on our pinned weights, and writes its
perplexity, with our fingerprint, through the store into the point's slot (kind `mit_reference`).
The script appends each token's NLL to {output_dir}/log.txt and writes exp(mean NLL) to
{output_dir}/ppl.txt (also the last line of its stdout); with --output-json, its metrics JSON as well.

A script that fails leaves no JSON (MitFailure: the stage prints one line with its exit code and goes on)
and the tails of its stdout/stderr in results/mit_bench/{dataset}_{label}.log.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import tempfile
from pathlib import Path

from . import assets
from .console import say
from .mit import SCRIPT, MitSpec, checkout, code_sha256
from .recorder import Recorder
from .settings import Settings
from .spec import ModelSpec
from .store import Store

LOG_TAIL_LINES = 200


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


def _tail(path: Path) -> list[str]:
    # tqdm redraws with carriage returns: each redraw counts as a line.
    lines = [s for s in re.split(r"[\r\n]+", path.read_text(encoding="utf-8", errors="replace")) if s.strip()]
    return lines[-LOG_TAIL_LINES:]


def _write_log(store: Store, path: Path, command: list[str], rc: int, out_dir: Path) -> list[str]:
    """The run's log beside the results; returns the stderr tail."""
    stderr = _tail(out_dir / "stderr.txt")
    text = "\n".join([f"$ {' '.join(command)}", f"exit code: {rc}",
                      f"--- stdout (last {LOG_TAIL_LINES} lines) ---", *_tail(out_dir / "stdout.txt"),
                      f"--- stderr (last {LOG_TAIL_LINES} lines) ---", *stderr, ""])
    store.tree.write(path, text.encode())
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


def make(store: Store, settings: Settings, *, progress: bool, device_shared_by: int) -> MitRunner:
    """A worker's runner of MitSpecs (streamkv/experiments: the mit stage's runner): MIT's script shows its own output and
    records no device placement of ours."""
    return MitRunner(store, settings)


class MitRunner(Recorder):
    """Runs MIT points one after another (the stage's runner for MitSpecs)."""

    kind = "mit_reference"

    def __init__(self, store: Store, settings: Settings):
        super().__init__(store)
        self.python = settings.python_bin
        self.repo = checkout(settings.mit_repo)

    def run(self, slot: str, spec: MitSpec) -> Path:
        """Run the script once and write the slot's JSON; MitFailure (and no JSON) when it fails."""
        # The slot's lock covers the log as well as the JSON: Store.sweep never takes its temp files.
        with self.store.lock(self.store.path(slot)):
            return self._run(slot, spec)

    def _run(self, slot: str, spec: MitSpec) -> Path:
        if code_sha256(self.repo) != spec.code_sha256:
            raise MitFailure(f"{slot}: {self.repo} changed since it was planned; run the stage again")
        path = self.store.path(slot)
        log = path.with_suffix(".log")
        # A JSON must never outlive the run it describes: drop the old one before the new run can fail.
        self.store.tree.unlink(path)
        model_dir = model_path(ModelSpec(name=spec.model["name"], revision=spec.model["revision"]))
        # The script's --output_dir lives outside results/: a run killed half-way leaves nothing there that
        # a scan of results/ could mistake for a result.
        with tempfile.TemporaryDirectory(prefix=f"streamkv-{path.stem}.") as tmp:
            out_dir = Path(tmp)
            command = [self.python, SCRIPT, "--model_name_or_path", model_dir, *spec.args, "--output_dir",
                       str(out_dir)]
            if spec.output_json:
                command += ["--output-json", str(out_dir / "metrics.json")]
            # Upstream installs streaming_llm with `setup.py develop`; the checkout on the path does the same.
            # No network at run time: MIT's script calls load_dataset / from_pretrained, which would download.
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(self.repo), os.environ.get("PYTHONPATH")]))}
            with open(out_dir / "stdout.txt", "wb") as so, open(out_dir / "stderr.txt", "wb") as se:
                rc = subprocess.run(command, cwd=self.repo, env=env, stdout=so, stderr=se).returncode
            stderr = _write_log(self.store, log, command, rc, out_dir)
            if rc != 0:
                last = stderr[-1].strip() if stderr else "no stderr"
                raise MitFailure(f"{slot}: {SCRIPT} failed with exit code {rc} ({last}); "
                                 f"stdout/stderr tails in {log}")
            try:
                ppl, nll, reported = _read_outputs(out_dir)
            except ValueError as e:
                raise MitFailure(f"{slot}: {SCRIPT} {e}; log in {log}") from None
        nll_sum = math.fsum(nll)
        limitations = list(spec.limitations)
        if len(nll) != spec.expected_predictions:
            limitations.append(f"It scored {len(nll)} tokens; our runs on this dataset score "
                               f"{spec.expected_predictions}.")
        metrics = {"perplexity": ppl, "nll_sum": nll_sum, "n_predicted_tokens": len(nll),
                   # exp(mean) of the logged NLLs in fp64: agrees with MIT's own number to its rounding
                   "perplexity_from_log": math.exp(nll_sum / len(nll)),
                   **({"mit_reported": reported} if reported else {})}
        self.record(slot, spec, metrics, nll,
                    mit={"repository": str(self.repo), **spec.provenance, "python": self.python,
                         "command": command[1:], "matches": spec.matches},
                    limitations=limitations,
                    # The guide: MIT numbers stay out of the main table unless verified in this environment.
                    use_in_main_table=False, artifacts={"log": log.name})
        say(f"mit-reference: {slot}: PPL {ppl:.3f}")
        return path
