#!/usr/bin/env bash
# Build NeurIPS/neurips_2025_compressed.pdf with generated tables, figures and the appendix switched on
# (the committed .tex keeps both off). All logic lives in streamkv/paper.py; extra arguments pass through,
# e.g. `scripts/build_pdf.sh --no-appendix`. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${VENV:-.venv}/bin/python" -m streamkv.paper "$@"
