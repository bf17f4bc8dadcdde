"""The Dockerfile built with buildah and run on CPU (docker/local-image.sh, the machinery of `make image-smoke`):
its failure paths end in one clear line. `make image-smoke` is the success path.

The image is built once per session, with the tag make image-smoke uses, so buildah's layer cache makes the
second of the two (whichever runs first) cost seconds. Needs root and buildah; .ci/run installs them and
sets STREAMKV_REQUIRE_BUILDAH=1, so there a machine without them fails instead of skipping."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docker/local-image.sh"
USER = "10001:10001"

if not (shutil.which("buildah") and shutil.which("debootstrap") and os.geteuid() == 0):
    if os.environ.get("STREAMKV_REQUIRE_BUILDAH") == "1":
        raise RuntimeError("STREAMKV_REQUIRE_BUILDAH=1 but buildah/debootstrap or root is missing: "
                           "apt-get install buildah podman debootstrap, and run as root")
    pytest.skip("needs root, buildah and debootstrap (apt-get install buildah podman debootstrap)",
                allow_module_level=True)


def script(*args: str, timeout: int = 1800, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def image() -> None:
    proc = script("build")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture
def container(image):
    proc = script("container")
    assert proc.returncode == 0, proc.stderr
    name = proc.stdout.strip()
    yield name
    subprocess.run(["buildah", "rm", name], capture_output=True)


def run(container: str, out: Path, user: str, *cmd: str) -> subprocess.CompletedProcess:
    return script("exec", container, str(out), user, *cmd, timeout=600)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("streamkv: error:")]


def test_a_torch_pin_the_lock_does_not_have_fails_the_build_before_pip(tmp_path):
    """TORCH_VERSION names a torch the lock does not pin: the deps stage stops with one line, before pip
    (which would otherwise install the lock's torch and build an image whose labels lie)."""
    proc = script("build", "--build-arg", "TORCH_VERSION=2.99.0",
                  env={"LOCAL_IMAGE": "localhost/streamkv:test-wrong-pin"})
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "requirements.lock does not pin torch==2.99.0" in output.splitlines()
    assert "Collecting " not in output


def test_a_missing_asset_is_one_line_naming_it(container, tmp_path):
    weights = "/app/data/demo/model.safetensors"
    script("volumes", str(tmp_path))
    assert run(container, tmp_path, "0:0", "rm", weights).returncode == 0   # as root: the image's files are root's

    verify = run(container, tmp_path, USER, "streamkv", "verify-assets")
    assert verify.returncode == 2
    assert "missing: data/demo/model.safetensors" in verify.stderr.splitlines()      # relative to /app
    assert error_lines(verify.stderr) == [
        "streamkv: error: 1 of 7 asset files do not match data/demo; the demo assets ship with the repository: "
        "restore data/demo/ from it (git checkout -- data/demo)"]

    baseline = run(container, tmp_path, USER, "streamkv", "baseline")
    assert baseline.returncode != 0
    (line,) = error_lines(baseline.stderr)
    assert weights in line, baseline.stderr
    assert not list((tmp_path / "app/results").glob("baselines/*"))      # no result (tokenized streams may be)


def test_the_paper_assets_missing_from_a_demo_image_name_streamkv_fetch(container, tmp_path):
    script("volumes", str(tmp_path))
    proc = run(container, tmp_path, USER, "env", "STREAMKV_PROFILE=paper", "streamkv", "verify-assets")
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [
        "streamkv: error: no asset manifest at data/manifest.json; run `streamkv fetch` on a machine with network "
        "access, or use the streamkv image (assets baked in)"]


def test_an_unwritable_results_volume_fails_in_one_line_before_any_work(container, tmp_path):
    script("volumes", str(tmp_path))
    results = tmp_path / "app/results"
    os.chown(results, 0, 0)
    results.chmod(0o755)
    proc = run(container, tmp_path, USER, "make", "paper")
    assert proc.returncode != 0
    assert error_lines(proc.stderr) == [
        "streamkv: error: results directory /app/results cannot be written: Permission denied"], proc.stderr
    assert not any(results.iterdir())
    assert not any((tmp_path / "app/NeurIPS/build").iterdir())       # stopped before the tables and the PDF


def test_the_smoke_sees_a_write_outside_the_volumes(container, tmp_path):
    """make image-smoke's last check: a file the run leaves in the container's own filesystem fails it, by
    name; files in the mounted volumes and /tmp do not."""
    out, stamp = tmp_path / "out", tmp_path / "stamp"
    out.mkdir()
    script("volumes", str(out))
    stamp.touch()
    assert run(container, out, USER, "sh", "-c", "touch /app/results/r /tmp/t").returncode == 0
    clean = script("writes", container, str(stamp))
    assert clean.returncode == 0, clean.stderr
    assert run(container, out, USER, "sh", "-c", "touch /home/streamkv/left-behind").returncode == 0
    dirty = script("writes", container, str(stamp))
    assert dirty.returncode == 1
    assert "  ./home/streamkv/left-behind" in dirty.stderr.splitlines()
