"""Figures are drawn from measured result files only, and are absent (old copies removed) without them."""
from __future__ import annotations

import json
import subprocess
import sys

from streamkv import figures
from streamkv.tables import Dataset
from streamkv.tables.cells import Cell

from conftest import tables_spec

SWEEP_R = (1, 4, 8)
SPEC = tables_spec(Dataset("demo-long", "Demo long"), Dataset("demo-short", "Demo short"), lazy_r=8,
                   sweeps={"R": SWEEP_R}, profile="demo", model="tiny", cap_total=64, n_sink=4)


def result(tmp_path, slot: str, lengths: list[int] | None, **metrics) -> Cell:
    """A result JSON with its cache_len artifact beside it, as the store writes them."""
    folder = tmp_path / slot.rsplit("/", 1)[0]
    folder.mkdir(parents=True, exist_ok=True)
    label = slot.rsplit("/", 1)[1]
    artifacts = {}
    if lengths is not None:
        (folder / f"{label}.cache_len.json").write_text(json.dumps(lengths))
        artifacts["cache_len"] = f"{label}.cache_len.json"
    path = folder / f"{label}.json"
    path.write_text(json.dumps({"slot": slot, "metrics": metrics, "artifacts": artifacts}))
    return Cell(slot=slot, metrics=metrics, config_hash=f"hash-{label}", stale=False, path=path,
                artifacts={k: folder / v for k, v in artifacts.items()})


def lazy_curve(soft: int, r: int, steps: int) -> list[int]:
    out, length = [], soft
    for _ in range(steps):
        out.append(length)
        length = soft if length + 1 - soft >= r else length + 1
    return out


def main_cells(tmp_path, lazy=None):
    return {"main/demo-long/strict": result(tmp_path, "main/demo-long/strict", [60] * 200),
            "main/demo-long/lazy": result(tmp_path, "main/demo-long/lazy",
                                          lazy if lazy is not None else lazy_curve(60, 8, 200))}


def sweep_cells(tmp_path):
    cells = {f"sweeps/demo-long/R={r}": result(tmp_path, f"sweeps/demo-long/R={r}", None, perplexity=30.0 + r,
                                               tpot_ms=5.0 - 0.1 * r, tpot_ms_spread=0.05)
             for r in SWEEP_R}
    cells["baselines/demo-long"] = result(tmp_path, "baselines/demo-long", None, perplexity=29.5, tpot_ms=9.0)
    return cells


def test_cache_lengths_reads_the_measured_artifact(tmp_path):
    curve = lazy_curve(60, 8, 50)
    assert figures.cache_lengths(result(tmp_path, "main/demo-long/lazy", curve)) == curve
    assert figures.cache_lengths(result(tmp_path, "main/demo-long/strict", None)) is None


def test_figures_are_drawn_deterministically_from_measured_data(tmp_path):
    cells = {**main_cells(tmp_path), **sweep_cells(tmp_path)}
    out = tmp_path / "generated"
    paths = figures.write_all(cells.get, SPEC, out)
    assert [p.name for p in paths] == [figures.CACHE_LEN, figures.R_SWEEP]
    first = {p.name: p.read_bytes() for p in paths}
    assert all(data.startswith(b"%PDF") for data in first.values())
    assert b"config_hash=hash-lazy" in first[figures.CACHE_LEN]      # provenance in the PDF's metadata
    assert b"CreationDate" not in first[figures.CACHE_LEN]
    figures.write_all(cells.get, SPEC, out)
    assert {p.name: p.read_bytes() for p in paths} == first, "same results must give the same bytes"
    # The curve is the measured list: another list gives another figure.
    other = {**cells, **main_cells(tmp_path / "other", lazy=lazy_curve(60, 5, 200))}
    figures.write_all(other.get, SPEC, out)
    assert (out / figures.CACHE_LEN).read_bytes() != first[figures.CACHE_LEN]


def test_the_r_sweep_marks_timings_taken_on_a_shared_gpu(tmp_path):
    cells = sweep_cells(tmp_path)
    assert not figures.r_sweep_figure(cells.get, SPEC)[0].axes[1].get_ylabel().endswith("‡")
    slot = "sweeps/demo-long/R=4"
    cells[slot] = result(tmp_path, slot, None, **cells[slot].metrics, device_shared_by=2)
    fig = figures.r_sweep_figure(cells.get, SPEC)[0]
    assert fig.axes[0].get_ylabel() == "PPL" and fig.axes[1].get_ylabel().endswith("‡")
    assert "same GPU" in fig.get_supxlabel()


def test_figures_are_absent_without_their_inputs_and_old_copies_are_removed(tmp_path):
    out = tmp_path / "generated"
    cells = {**main_cells(tmp_path), **sweep_cells(tmp_path)}
    figures.write_all(cells.get, SPEC, out)
    del cells["main/demo-long/lazy"]
    del cells["sweeps/demo-long/R=4"]        # an incomplete sweep is not plotted with a silent gap
    assert figures.write_all(cells.get, SPEC, out) == []
    assert not (out / figures.CACHE_LEN).exists() and not (out / figures.R_SWEEP).exists()


def test_missing_artifact_means_no_figure(tmp_path):
    cells = main_cells(tmp_path)
    cells["main/demo-long/lazy"] = result(tmp_path, "main/demo-long/lazy", None)
    assert figures.write_all(cells.get, SPEC, tmp_path / "generated") == []


def test_figures_never_import_torch():
    code = "import streamkv.figures, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
