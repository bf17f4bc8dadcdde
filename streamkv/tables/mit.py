"""mit_reference.tex (appendix): MIT streaming-llm's own perplexity beside ours, with the difference.

One row per MIT reference point (the mit stage's rows): MIT's eval_long_ppl.py with our Start+Recent sizes
against our Start+Recent point, and the window-matched run (Lazy Pruning's recent window) against Lazy
Pruning. No rows (RUN_MIT_REFERENCE=0): no table.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .cells import Lookup
from .columns import trace
from .layout import INSERT, Entry, Group, Row, Table

if TYPE_CHECKING:
    from . import Comparison, TablesSpec

HEADERS = ("Dataset", "MIT run", "MIT PPL", "Ours", "Our PPL", "ΔPPL (MIT − ours)", "Tokens (MIT / ours)")
ALIGN = ("l", "l", "r", "l", "r", "r", "r")


def _ppl(cell) -> Entry:
    if cell is None:
        return Entry(INSERT)
    return Entry(format(cell.metric("perplexity"), ".3f"), ("stale",) if cell.stale else ())


def _row(lookup: Lookup, c: "Comparison") -> Row:
    mit, ours = lookup(c.reference.slot), lookup(c.ours.slot)
    both = mit is not None and ours is not None
    marks = ("stale",) if both and (mit.stale or ours.stale) else ()
    # Three significant digits: the two implementations may agree far below the table's 3 decimals.
    delta = Entry(format(mit.metric("perplexity") - ours.metric("perplexity"), "+.3g"), marks) if both \
        else Entry(INSERT)
    tokens = Entry(f"{mit.metric('n_predicted_tokens')} / {ours.metric('n_predicted_tokens')}") if both \
        else Entry(INSERT)
    entries = (Entry(c.dataset), Entry(c.reference.display), _ppl(mit), Entry(c.ours.display), _ppl(ours),
               delta, tokens)
    return Row(entries, f"{trace(c.reference.slot, mit)}; {trace(c.ours.slot, ours)}")


def _caption(comparisons: "tuple[Comparison, ...]") -> str:
    origin = comparisons[0].provenance
    commit = (origin.get("commit") or "unknown commit")[:7]
    patch = (f", with our setup patch {origin['patch']} (GPT-NeoX cache layout, device and dtype options, our stream "
             "file, tokenizer file format; nothing that touches the attention or the eviction)"
             if origin.get("patch") else ", unmodified")
    return (f"MIT streaming-llm's examples/eval_long_ppl.py (commit {commit}{patch}) on the same model, "
            "tokens and Start+Recent sizes as ours. The window-matched run keeps Lazy Pruning's recent window "
            "and is compared with Lazy Pruning; the other with Start+Recent.")


def build(lookup: Lookup, spec: "TablesSpec") -> Table | None:
    comparisons = spec.rows.get("mit", ())
    if not comparisons:
        return None
    rows = tuple(_row(lookup, c) for c in comparisons)
    return Table("mit_reference", "tab:mit", _caption(comparisons), HEADERS, ALIGN, (Group(None, rows),))
