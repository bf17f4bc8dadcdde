"""The paper compiles with generated content on and off, shows the generated numbers, and builds the same bytes."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from streamkv import context, figures, paper, reports
from streamkv.settings import Settings
from streamkv.tables import Comparison, Dataset, Line, write_all
from streamkv.tables.cells import Cell

from conftest import tables_spec

NEURIPS = Path(__file__).resolve().parents[1] / "NeurIPS"
TEX = NEURIPS / f"{paper.PAPER}.tex"
SPEC = tables_spec(Dataset("demo-long", "Demo long"), Dataset("demo-short", "Demo short"), lazy_r=8,
                   sweeps={"R": (1, 8)}, profile="demo", model="tiny GPT-NeoX", cap_total=64, n_sink=4)
FAKE_PPL = "31.415"        # a value no placeholder or default could produce

needs_latex = pytest.mark.skipif(shutil.which("latexmk") is None or shutil.which("pdftotext") is None,
                                 reason="latexmk/pdftotext not installed (CI installs texlive-latex-base, "
                                        "texlive-latex-recommended, texlive-fonts-recommended, latexmk, "
                                        "poppler-utils)")


def test_committed_switches_default_to_placeholders_and_no_appendix():
    tex = TEX.read_text(encoding="utf-8")
    assert re.search(r"^\\usegeneratedfalse$", tex, re.MULTILINE)
    assert re.search(r"^\\useappendixfalse$", tex, re.MULTILINE)
    assert r"\ifdefined\streamkvusegenerated" in tex and r"\ifdefined\streamkvuseappendix" in tex


def test_every_citation_is_in_the_bibliography():
    keys = set(re.findall(r"@\w+\{([^,]+),", (NEURIPS / "references.bib").read_text(encoding="utf-8")))
    cited = {k.strip() for group in re.findall(r"\\cite[tp]?\{([^}]+)\}", TEX.read_text(encoding="utf-8"))
             for k in group.split(",")}
    assert cited and cited <= keys


def test_missing_latexmk_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(paper.shutil, "which", lambda name: None)
    (tmp_path / f"{paper.PAPER}.tex").write_text("")
    with pytest.raises(paper.PaperError) as err:
        paper.build_pdf(tmp_path)
    assert "latexmk not found" in str(err.value) and "\n" not in str(err.value)


def test_pdf_command_error_is_the_streamkv_one_line_exit_2(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from streamkv import cli

    monkeypatch.setattr(paper.shutil, "which", lambda name: None)
    (tmp_path / f"{paper.PAPER}.tex").write_text("")
    result = CliRunner().invoke(cli.main, ["pdf", "--neurips-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("streamkv: error: latexmk not found") and not result.stdout


@pytest.fixture
def paper_dir(tmp_path):
    """A copy of NeurIPS/ with generated tables, meta and figures from fake results."""
    for name in (TEX.name, "references.bib"):
        shutil.copy(NEURIPS / name, tmp_path / name)
    cells = {"baselines/demo-long": Cell("baselines/demo-long", {"perplexity": 30.0, "tpot_ms": 9.0}, "h-base"),
             "main/demo-long/lazy": Cell("main/demo-long/lazy", {"perplexity": float(FAKE_PPL), "tpot_ms": 3.0},
                                         "h-lazy", stale=True)}
    write_all(cells.get, SPEC, tmp_path / "generated")
    figures.write_all(cells.get, SPEC, tmp_path / "generated")
    return tmp_path


def pdf_text(pdf: Path) -> str:
    out = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    return " ".join(out.split())


def test_the_pdf_is_copied_next_to_the_tex_unless_that_place_links_to_the_build(monkeypatch, tmp_path):
    """The image links NeurIPS/<paper>.pdf to build/<paper>.pdf (its volume), so that a run writes nothing
    outside its volumes: then there is nothing to copy (copying a file onto itself would fail)."""
    def fake_latexmk(cmd, cwd, **kwargs):
        (Path(cwd) / "build").mkdir(exist_ok=True)
        (Path(cwd) / "build" / f"{paper.PAPER}.pdf").write_bytes(b"%PDF-fake")
        return subprocess.CompletedProcess(cmd, 0, "")

    monkeypatch.setattr(paper.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(paper.subprocess, "run", fake_latexmk)
    (tmp_path / f"{paper.PAPER}.tex").write_text("")
    out = tmp_path / f"{paper.PAPER}.pdf"

    assert paper.build_pdf(tmp_path) == out and not out.is_symlink() and out.read_bytes() == b"%PDF-fake"
    out.unlink()
    out.symlink_to(f"build/{paper.PAPER}.pdf")
    assert paper.build_pdf(tmp_path) == out and out.is_symlink() and out.read_bytes() == b"%PDF-fake"


@needs_latex
def test_pdf_with_generated_content_shows_the_results(paper_dir):
    pdf = paper.build_pdf(paper_dir, use_generated=True, use_appendix=True)
    assert pdf == paper_dir / f"{paper.PAPER}.pdf"
    text = pdf_text(pdf)
    assert FAKE_PPL in text
    assert "Built from the demo profile" in text            # the title-page notice from meta.tex
    assert "Stale result" in text                            # the dagger's footnote
    assert "Quantization" in text                            # the appendix's negative-results table
    assert "[INSERT DATA]" in text                           # figures and cells without results
    first = pdf.read_bytes()
    shutil.rmtree(paper_dir / "build")
    assert paper.build_pdf(paper_dir).read_bytes() == first, "the PDF must be byte-for-byte reproducible"


@needs_latex
def test_mit_reference_appendix_compiles_beside_our_number(paper_dir):
    mit = Line("MIT Start+Recent", "mit_bench/demo-long_mit_reference")
    ours = SPEC.rows["main"][0].lines[0]
    spec = replace(SPEC, rows={**SPEC.rows, "mit": (Comparison("Demo long", mit, ours, {
        "commit": "2e50426" + "0" * 33, "patch": "scripts/mit/streaming-llm.patch"}),)})
    cells = {mit.slot: Cell(mit.slot, {"perplexity": 31.5, "n_predicted_tokens": 99}, "h-mit"),
             ours.slot: Cell(ours.slot, {"perplexity": 31.25, "n_predicted_tokens": 99}, "h-ours")}
    write_all(cells.get, spec, paper_dir / "generated")
    text = pdf_text(paper.build_pdf(paper_dir, use_generated=True, use_appendix=True))
    assert "official StreamingLLM code as a reference" in text
    assert "31.500" in text and "31.250" in text and "+0.25" in text and "99 / 99" in text


@needs_latex
def test_pdf_without_generated_content_shows_placeholders(paper_dir):
    text = pdf_text(paper.build_pdf(paper_dir, use_generated=False, use_appendix=False))
    assert FAKE_PPL not in text and "Built from the demo profile" not in text
    assert "[INSERT DATA]" in text and "Quantization" not in text


def test_streams_cite_their_papers_only_in_the_paper_profile(tmp_path):
    """The demo streams are pydoc text: the demo PDF must name that, not cite PG19 or WikiText-103."""
    keys = set(re.findall(r"@\w+\{([^,]+),", (NEURIPS / "references.bib").read_text(encoding="utf-8")))
    metas = {}
    for name in ("demo", "paper"):
        ctx = context.context(Settings(profile=name, results_dir=str(tmp_path)), tokenize=False)
        metas[name] = write_all(lambda slot: None, reports.tables_spec(ctx), tmp_path / name)[-1].read_text()
    assert r"\citep" not in metas["demo"] and "pydoc" in metas["demo"]
    cited = set(re.findall(r"\\citep\{([^}]+)\}", metas["paper"]))
    assert cited == {"rae2020compressive", "merity2017pointer"} and cited <= keys
