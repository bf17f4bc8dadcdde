#!/usr/bin/env bash
# Make sure latexmk and pdflatex exist before building the PDF. On a fresh Debian machine where we are
# root, install the few TeX Live packages the paper needs; otherwise say exactly what to install.
set -euo pipefail
packages=(texlive-latex-base texlive-latex-recommended texlive-fonts-recommended latexmk poppler-utils)
if command -v latexmk >/dev/null && command -v pdflatex >/dev/null && command -v pdftotext >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "streamkv: installing TeX Live from Debian: ${packages[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  exit 0
fi
echo "streamkv: error: latexmk/pdflatex not found; install them, e.g. sudo apt-get install ${packages[*]}" >&2
exit 1
