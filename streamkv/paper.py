"""Build NeurIPS/neurips_2025_compressed.pdf with latexmk.

The committed .tex shows placeholders and no appendix by default (the guide's switches); this build turns
generated content and the appendix on from the command line, through latexmk's -usepretex, so nobody has to
edit the committed file. Output goes to NeurIPS/build/ and the PDF is copied next to the .tex.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click

from .settings import under_root

PAPER = "neurips_2025_compressed"
_ERROR_LINE = re.compile(r"^(!.*|\S+:\d+: .*)$", re.MULTILINE)   # "! ..." or "-file-line-error" style


class PaperError(RuntimeError):
    """A build failure, reported as one line."""


def _first_error(log: Path) -> str:
    try:
        match = _ERROR_LINE.search(log.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return "no log written"
    return match.group(1).strip() if match else "no error line in the log"


def build_pdf(neurips_dir: Path | str | None = None, *, use_generated: bool = True,
              use_appendix: bool = True) -> Path:
    """Compile the paper in `neurips_dir` (default: the repository's NeurIPS/; build files in its build/);
    returns the copied PDF's path."""
    src = Path(neurips_dir) if neurips_dir is not None else under_root("NeurIPS")
    if not (src / f"{PAPER}.tex").is_file():
        raise PaperError(f"{src / f'{PAPER}.tex'} not found: --neurips-dir must name the paper's directory")
    latexmk = shutil.which("latexmk")
    if latexmk is None:
        # scripts/ensure_tex.sh owns the list of Debian packages; point there rather than repeat it.
        raise PaperError("latexmk not found: run scripts/ensure_tex.sh (installs TeX Live from Debian when "
                         "root, else prints the packages to install), or `make pdf`")
    pretex = (rf"\def\streamkvusegenerated{{{int(use_generated)}}}"
              rf"\def\streamkvuseappendix{{{int(use_appendix)}}}")
    # -g: the switches are not files latexmk watches, so force a full run rather than trust its cache.
    cmd = [latexmk, "-pdf", "-g", "-interaction=nonstopmode", "-halt-on-error", "-file-line-error",
           "-outdir=build", f"-usepretex={pretex}", f"{PAPER}.tex"]
    # Fixed clock for anything that reads it (the .tex omits dates already): same inputs, same bytes.
    env = {**os.environ, "SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", "0"), "FORCE_SOURCE_DATE": "1"}
    proc = subprocess.run(cmd, cwd=src, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    built = src / "build" / f"{PAPER}.pdf"
    if proc.returncode != 0 or not built.exists():
        log = src / "build" / f"{PAPER}.log"
        raise PaperError(f"latexmk failed (exit {proc.returncode}): {_first_error(log)} (see {log})")
    out = src / f"{PAPER}.pdf"
    # The image links the copy's place to build/'s PDF, so that the PDF lives in its build/ volume alone.
    if not (out.is_symlink() and out.resolve() == built.resolve()):
        shutil.copyfile(built, out)
    return out


@click.command("pdf")
@click.option("--neurips-dir", default=None, type=click.Path(file_okay=False),
              help="[default: NeurIPS in the repository]")
@click.option("--generated/--no-generated", default=True, show_default=True,
              help="Include NeurIPS/generated/ (tables, figures, meta) instead of placeholders.")
@click.option("--appendix/--no-appendix", default=True, show_default=True,
              help="Include the appendix (sweeps, negative results).")
def pdf_command(neurips_dir: str | None, generated: bool, appendix: bool) -> None:
    """Build the paper PDF with latexmk."""
    # A PaperError propagates: `streamkv`'s group prints it as one line and exits 2.
    click.echo(str(build_pdf(neurips_dir, use_generated=generated, use_appendix=appendix)))


if __name__ == "__main__":
    try:
        pdf_command()
    except PaperError as err:
        click.echo(f"streamkv: error: {' '.join(str(err).split())}", err=True)
        sys.exit(2)
