"""End to end: `make paper` on the demo profile (reduced grid) in a copy of the repository, then the PDF text
must show the very perplexities the result JSON holds. Needs TeX Live and pdftotext (CI installs them)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent

pytestmark = pytest.mark.skipif(shutil.which("latexmk") is None or shutil.which("pdftotext") is None,
                                reason="latexmk/pdftotext not installed (CI installs them via scripts/ensure_tex.sh)")


def _copy_of_repo(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def test_make_paper_on_the_demo_profile_puts_the_json_numbers_in_the_pdf(tmp_path):
    repo = _copy_of_repo(tmp_path / "repo")
    env = {**os.environ, "PYTHONPATH": str(repo), "STREAMKV_PROFILE": "demo", "RUN_ABLATIONS": "0",
           "SWEEP_R_VALUES": "1 16", "VENV": str(VENV), "STREAMKV": f"{VENV}/bin/python -m streamkv"}
    # -o: the venv this test runs in is the installed one; make must not rebuild it for the copy.
    done = subprocess.run(["make", "-o", f"{VENV}/.installed", "paper"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    pdf = repo / "NeurIPS" / "neurips_2025_compressed.pdf"
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True,
                          check=True).stdout
    for slot in ("main/demo-long/strict", "main/demo-long/lazy", "main/demo-short/lazy"):
        result = json.loads((repo / "results" / "paper_experiments" / f"{slot}.json").read_text())
        assert f"{result['metrics']['perplexity']:.3f}" in text, slot
    baseline = json.loads((repo / "results" / "baselines" / "demo-long_baseline_avg.json").read_text())
    assert f"{baseline['metrics']['perplexity']:.3f}" in text
    assert "demo profile" in text.lower()   # the title page says what the numbers are

    # `make tex` alone rebuilds the tables from the stored results without computing anything.
    tables = repo / "NeurIPS" / "generated" / "tables.tex"
    tables.unlink()
    done = subprocess.run(["make", "-o", f"{VENV}/.installed", "tex"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{baseline['metrics']['perplexity']:.3f}" in tables.read_text()
