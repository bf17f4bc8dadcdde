"""A table as data, independent of how it is printed.

Every generator builds a `Table`; `render.py` turns it into booktabs LaTeX for the paper and into plain text
for `streamkv tables`. Entries hold plain text plus note marks, so the two renderings cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

INSERT = "[INSERT DATA]"       # the guide's marker for a cell whose result file is missing
UNRECORDED = "--"              # the result exists but does not record this metric


@dataclass(frozen=True)
class Note:
    latex_mark: str            # superscript placed after the entry in LaTeX ("" for none)
    text_mark: str             # the same in plain text
    latex: str                 # footnote below the table, LaTeX
    text: str                  # footnote, plain text


# Notes an entry can carry; a table prints the footnote of each note it uses, in this order.
NOTES = {
    "stale": Note(r"$^{\dagger}$", "†",
                  r"$^{\dagger}$\,Stale result: its configuration hash no longer matches the current plan; "
                  r"shown only because \texttt{ALLOW\_STALE\_RESULTS=1}.",
                  "† Stale result: its configuration hash no longer matches the current plan; "
                  "shown only because ALLOW_STALE_RESULTS=1."),
    "shared": Note(r"$^{\ddagger}$", "‡",
                   r"$^{\ddagger}$\,Timed by one of several workers placed on the same GPU (more "
                   r"\texttt{--workers} than GPUs): the time may include the others' work. Time with one worker "
                   r"per GPU.",
                   "‡ Timed by one of several workers placed on the same GPU (more --workers than GPUs): the "
                   "time may include the others' work. Time with one worker per GPU."),
    "kv": Note(r"$^{\ast}$", "*",
               r"$^{\ast}$\,Analytic KV-cache size: no CUDA peak-memory statistics were recorded (CPU run).",
               "* Analytic KV-cache size: no CUDA peak-memory statistics were recorded (CPU run)."),
    "unrecorded": Note("", "",
                       r"--\,: not recorded in the result file.",
                       "-- : not recorded in the result file."),
}


@dataclass(frozen=True)
class Entry:
    text: str                          # plain text (numbers, markers or prose); escaped by the LaTeX renderer
    marks: tuple[str, ...] = ()        # keys of NOTES


@dataclass(frozen=True)
class Row:
    entries: tuple[Entry, ...]         # the first entry is the row label
    trace: str                         # provenance, printed as a LaTeX comment above the row


@dataclass(frozen=True)
class Group:
    title: str | None                  # a spanning sub-heading, or None for no heading
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class Table:
    name: str                          # output file stem in NeurIPS/generated/, e.g. "tables"
    label: str                         # LaTeX \label, e.g. "tab:main"
    caption: str                       # plain text
    headers: tuple[str, ...]
    align: tuple[str, ...]             # LaTeX column types, one per header
    groups: tuple[Group, ...]

    def notes_used(self) -> list[str]:
        used = {m for g in self.groups for r in g.rows for e in r.entries for m in e.marks}
        return [key for key in NOTES if key in used]
