"""Generated LaTeX tables: [INSERT DATA] for missing cells, traceable numbers, stale marking, no torch."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from streamkv.tables import Dataset, TablesSpec, render_text, write_all
from streamkv.tables import ablations, main, negative, sweeps
from streamkv.tables.cells import Cell
from streamkv.tables.render import escape, to_latex

from conftest import tables_spec

SPEC = tables_spec(Dataset("pg19", "PG19"), Dataset("wikitext", "WikiText-103"), lazy_r=64,
                   ablations=(("lazy", "Lazy Pruning"), ("abs_pos", "Absolute positions")),
                   sweeps={"R": (1, 64), "sigma": (16,)},
                   profile="demo", model="Pythia-2.8B", cap_total=2048, n_sink=32)


def cell(slot: str, ppl: float, tpot: float, *, stale: bool = False, **metrics) -> Cell:
    return Cell(slot=slot, metrics={"perplexity": ppl, "tpot_ms": tpot, **metrics},
                config_hash=f"hash-{slot.replace('/', '-')}", stale=stale, path=f"results/{slot}.json")


def lookup_of(*cells: Cell):
    table = {c.slot: c for c in cells}
    return table.get


def row_of(tex: str, label: str) -> str:
    return next(line for line in tex.splitlines() if line.startswith(label))


def comment_above(tex: str, label: str) -> str:
    lines = tex.splitlines()
    return lines[lines.index(row_of(tex, label)) - 1]


def test_missing_results_print_insert_data_in_every_cell():
    tex = to_latex(main.build(lookup_of(), SPEC))
    lazy = row_of(tex, "Lazy Pruning (R = 64)")
    assert lazy.count("[INSERT DATA]") == len(main.COLUMNS)
    assert comment_above(tex, "Lazy Pruning (R = 64)") == "% slot=main/pg19/lazy missing"
    assert not re.search(r"\d+\.\d{3}", tex), "no number may appear without a result"


def test_present_results_fill_formatted_numbers_with_their_config_hash():
    cells = (cell("baselines/pg19", 19.761, 97.91, peak_memory_mb={"prefill": 6000.0, "decode": 6100.04}),
             cell("main/pg19/lazy", 20.318, 14.37, peak_memory_mb={"prefill": 5000.0, "decode": 5600.0}))
    tex = to_latex(main.build(lookup_of(*cells), SPEC))
    # TPOT 2 decimals, speedup 97.91 / 14.37, PPL 3 decimals, signed ΔPPL, peak memory over phases.
    assert row_of(tex, "Lazy Pruning") == r"Lazy Pruning (R = 64) & 14.37 & 6.81 & 20.318 & +0.557 & 5600.0 \\"
    assert row_of(tex, "Baseline") == (r"Baseline (sliding-window recompute) & 97.91 & 1.00 & 19.761 & +0.000 "
                                       r"& 6100.0 \\")
    assert comment_above(tex, "Lazy Pruning (R = 64)") == (
        "% slot=main/pg19/lazy config_hash=hash-main-pg19-lazy file=results/main/pg19/lazy.json")


def test_trace_shows_result_files_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = Cell("main/pg19/lazy", {"perplexity": 20.318}, "abc", path=tmp_path / "results" / "lazy.json")
    tex = to_latex(main.build(lookup_of(found), SPEC))
    assert comment_above(tex, "Lazy Pruning") == "% slot=main/pg19/lazy config_hash=abc file=results/lazy.json"
    assert "[INSERT DATA]" in row_of(tex, "Start+Recent")
    assert r"$^{\dagger}$" not in tex and "Stale result" not in tex


def test_missing_baseline_leaves_derived_cells_empty():
    tex = to_latex(main.build(lookup_of(cell("main/pg19/strict", 20.181, 19.57)), SPEC))
    assert row_of(tex, "Start+Recent") == ("Start+Recent (R = 1) & 19.57 & {[INSERT DATA]} & 20.181 & "
                                           "{[INSERT DATA]} & -- \\\\")


def test_stale_result_gets_a_dagger_and_a_footnote():
    cells = (cell("baselines/pg19", 19.761, 97.91), cell("main/pg19/lazy", 20.318, 14.37, stale=True))
    tex = to_latex(main.build(lookup_of(*cells), SPEC))
    assert row_of(tex, "Lazy Pruning").startswith(r"Lazy Pruning (R = 64)$^{\dagger}$ & 14.37")
    assert comment_above(tex, "Lazy Pruning").endswith(" stale")
    assert r"$^{\dagger}$\,Stale result" in tex
    assert r"$^{\dagger}$" not in row_of(tex, "Baseline")


def test_stale_baseline_marks_the_values_derived_from_it():
    cells = (cell("baselines/pg19", 19.761, 97.91, stale=True), cell("main/pg19/lazy", 20.318, 14.37))
    row = row_of(to_latex(main.build(lookup_of(*cells), SPEC)), "Lazy Pruning")
    assert r"6.81$^{\dagger}$" in row and r"+0.557$^{\dagger}$" in row and r"20.318$^{\dagger}$" not in row


def test_timings_taken_on_a_shared_gpu_are_marked_and_what_derives_from_them():
    alone, shared = dict(device_shared_by=1), dict(device_shared_by=2)
    cells = (cell("baselines/pg19", 19.761, 97.91, **alone), cell("main/pg19/lazy", 20.318, 14.37, **shared),
             cell("main/pg19/strict", 20.181, 19.57, **alone))
    tex = to_latex(main.build(lookup_of(*cells), SPEC))
    lazy, strict = row_of(tex, "Lazy Pruning"), row_of(tex, "Start+Recent")
    # TPOT and the speedup carry the mark; the perplexity and memory of the same run do not.
    assert r"& 14.37$^{\ddagger}$ & 6.81$^{\ddagger}$ & 20.318 & +0.557 &" in lazy
    assert r"\ddagger" not in strict and r"\ddagger" not in row_of(tex, "Baseline")
    assert "Timed by one of several workers placed on the same GPU" in tex
    # A baseline timed on a shared GPU marks every speedup divided by it, not the other TPOTs.
    cells = (cell("baselines/pg19", 19.761, 97.91, **shared), cell("main/pg19/strict", 20.181, 19.57, **alone))
    strict = row_of(to_latex(main.build(lookup_of(*cells), SPEC)), "Start+Recent")
    assert r"& 19.57 & 5.00$^{\ddagger}$ &" in strict
    # Results written before the count was recorded are not marked.
    assert r"\ddagger" not in to_latex(main.build(lookup_of(cell("main/pg19/lazy", 20.318, 14.37)), SPEC))


def test_memory_falls_back_to_marked_kv_bytes_and_unrecorded_metrics_show_dashes():
    cells = (cell("baselines/pg19", 19.761, 97.91), cell("main/pg19/lazy", 20.318, 14.37, kv_cache_bytes=3 << 20))
    tex = to_latex(main.build(lookup_of(*cells), SPEC))
    assert row_of(tex, "Lazy Pruning").endswith(r"& 3.0$^{\ast}$ \\")
    assert row_of(tex, "Baseline").endswith(r"& -- \\")
    assert "Analytic KV-cache size" in tex and "not recorded in the result file" in tex


def test_ablation_and_sweep_tables_ask_for_their_slots():
    asked = []

    def lookup(slot):
        asked.append(slot)
        return cell(slot, 20.0, 15.0) if slot == "sweeps/pg19/sigma=16" else None

    ablations.build(lookup, SPEC)
    tex = to_latex(sweeps.build(lookup, SPEC))
    assert {"ablations/pg19/lazy", "ablations/pg19/abs_pos", "baselines/pg19", "sweeps/pg19/R=1",
            "sweeps/pg19/R=64", "sweeps/pg19/sigma=16"} <= set(asked)
    assert not any("delta" in slot for slot in asked), "an empty grid leaves its block out"
    assert r"\textit{Sweep over $\sigma$}" in tex
    assert row_of(tex, r"$\sigma$ = 16").startswith(r"$\sigma$ = 16 & 15.00 & {[INSERT DATA]} & 20.000")
    assert "% slot=sweeps/pg19/sigma=16 config_hash=hash-sweeps-pg19-sigma=16" in tex


def test_negative_results_come_from_the_data_file():
    rows = json.loads(negative.DATA.read_text(encoding="utf-8"))["rows"]
    assert all(set(r) == {"approach", "tried", "outcome", "excluded"} and all(r.values()) for r in rows)
    tex = to_latex(negative.build(None, SPEC))
    for topic in ("Quantization", "CUDA kernel fusion", "FlashAttention", "torch.compile"):
        assert topic in tex
    assert tex.count("% source=negative_results.json row=") == len(rows)


def test_write_all_writes_every_file_and_text_rendering_matches(tmp_path):
    cells = (cell("baselines/pg19", 19.761, 97.91), cell("main/pg19/lazy", 20.318, 14.37, stale=True))
    (tmp_path / "generated").mkdir()
    (tmp_path / "generated" / "mit_reference.tex").write_text("% from an earlier build with MIT's reference")
    paths = write_all(lookup_of(*cells), SPEC, tmp_path / "generated")
    assert [p.name for p in paths] == ["tables.tex", "ablations.tex", "sweeps.tex", "negative_results.tex",
                                       "meta.tex"]
    assert not (tmp_path / "generated" / "mit_reference.tex").exists()   # no MIT rows planned: no table
    for p in paths[:4]:
        tex = p.read_text(encoding="utf-8")
        assert tex.count(r"\begin{") == tex.count(r"\end{") and r"\toprule" in tex and r"\bottomrule" in tex
    meta = paths[-1].read_text(encoding="utf-8")
    assert r"\def\streamkvProfile{demo}" in meta and "Built from the demo profile" in meta
    text = render_text(lookup_of(*cells), SPEC)
    assert "Lazy Pruning (R = 64)†" in text and "20.318" in text and "[INSERT DATA]" in text
    assert "† Stale result" in text


def test_paper_profile_has_no_demo_notice(tmp_path):
    spec = TablesSpec(**{**SPEC.__dict__, "profile": "paper"})
    meta = write_all(lookup_of(), spec, tmp_path)[-1].read_text(encoding="utf-8")
    assert r"\def\streamkvNotice{}" in meta


def test_random_weights_put_timing_only_on_the_title_page(tmp_path):
    spec = TablesSpec(**{**SPEC.__dict__, "profile": "paper-random", "random_weights": True})
    meta = write_all(lookup_of(), spec, tmp_path)[-1].read_text(encoding="utf-8")
    assert r"\def\streamkvNotice{Random weights: timing only." in meta


@pytest.mark.parametrize("text, tex", [("a_b 50% & #1", r"a\_\allowbreak{}b 50\% \& \#1"),
                                       ("σ ≥ R", r"$\sigma$ $\geq$ R")])
def test_escape(text, tex):
    assert escape(text) == tex


def test_tables_never_import_torch():
    code = "import streamkv.tables, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_engine_table_divides_by_the_same_engines_tpot_without_eviction():
    from types import SimpleNamespace

    from streamkv.store import Cell
    from streamkv.tables import EngineRow, Line, engines

    def cell(slot, tpot, spread=0.0):
        return Cell(slot, {"tpot_ms": tpot, "tpot_ms_spread": spread}, "a" * 64)

    cells = {c.slot: c for c in (cell("d0", 20.0, 4.0), cell("d1", 22.0), cell("d64", 18.0),
                                 cell("f0", 2.5), cell("f1", 2.6, 0.01))}   # f64 missing
    rows = (EngineRow("PG19", "HF decode", Line("No eviction", "d0"), (Line("strict", "d1"), Line("lazy", "d64"))),
            EngineRow("PG19", "fast", Line("No eviction", "f0"), (Line("strict", "f1"), Line("lazy", "f64"))))
    table = engines.build(cells.get, SimpleNamespace(rows={"bench": rows}))   # the generator reads the bench rows only
    texts = [[e.text for e in r.entries] for g in table.groups for r in g.rows]
    assert texts[0] == ["HF decode", "20.00 ± 4.00", "22.00", "1.100", "18.00", "0.900"]
    assert texts[1] == ["fast", "2.50", "2.60 ± 0.01", "1.040", "[INSERT DATA]", "[INSERT DATA]"]
    cells["d64"] = Cell("d64", {"tpot_ms": 18.0, "device_shared_by": 2}, "a" * 64)   # timed beside a worker
    table = engines.build(cells.get, SimpleNamespace(rows={"bench": rows}))
    assert [e.marks for e in table.groups[0].rows[0].entries][3:] == [(), ("shared",), ("shared",)]
    assert table.headers == ("Engine", "No eviction", "strict", "Overhead", "lazy", "Overhead")
    assert "PG19" in table.caption
