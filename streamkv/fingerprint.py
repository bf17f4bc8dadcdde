"""The environment a result was produced in, and how two environments differ.

`collect()` records what can move a number: code (git commit + dirty flag), library versions, the GPU
and its driver, the CPU. Never the hostname: results are shared. `compare()` names the differences that
make a reused baseline's timings incomparable (GPU, torch, CUDA, transformers, dtype).
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMPARED = ("gpu_name", "torch", "cuda", "transformers", "dtype")


def _run(*cmd: str) -> str | None:
    """stdout of a command, or None when it is missing or fails (no git checkout, no driver)."""
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _git() -> tuple[str | None, bool | None]:
    """Commit and dirty flag of the checkout. The image has no .git: there the build args
    STREAMKV_GIT_COMMIT / STREAMKV_GIT_DIRTY (set by `make image`) name the commit it was built from."""
    commit = _run("git", "rev-parse", "HEAD")
    if commit:
        status = _run("git", "status", "--porcelain")
        return commit, None if status is None else bool(status)
    dirty = os.environ.get("STREAMKV_GIT_DIRTY")
    return os.environ.get("STREAMKV_GIT_COMMIT") or None, None if not dirty else dirty == "1"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _gpu(torch) -> tuple[str | None, str | None]:
    """(GPU name, driver version): nvidia-smi knows the driver; torch alone knows the name."""
    if shutil.which("nvidia-smi"):
        out = _run("nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader")
        if out:
            name, _, driver = out.splitlines()[0].partition(",")
            return name.strip(), driver.strip() or None
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), None
    return None, None


def collect() -> dict:
    # torch is imported here, not at module level: the tables and status paths import this module's
    # compare() and must stay free of torch.
    import torch

    commit, dirty = _git()
    gpu_name, driver = _gpu(torch)
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": _version("transformers"),
        "datasets": _version("datasets"),
        "tokenizers": _version("tokenizers"),
        "gpu_name": gpu_name,
        "gpu_driver": driver,
        "device_count": torch.cuda.device_count(),
        "torch_threads": torch.get_num_threads(),   # CPU threads the run was given (Runner sets them)
    }


def normalize_dtype(value) -> str | None:
    """One spelling per dtype: "torch.float16", "float16" and torch.float16 all become "float16"."""
    if value is None:
        return None
    return str(value).strip().removeprefix("torch.")


def compare(a: dict, b: dict) -> list[str]:
    """Human-readable mismatches between two fingerprints on the keys that move timings.

    A fingerprint may carry "dtype" (the runner adds the model's dtype); it is compared as a dtype, not as
    a string: the seed compared "torch.float16" with "float16" and so always reported a mismatch.
    """
    problems = []
    for key in COMPARED:
        left, right = a.get(key), b.get(key)
        if key == "dtype":
            left, right = normalize_dtype(left), normalize_dtype(right)
        if left != right:
            problems.append(f"{key}: {left} vs {right}")
    return problems
