"""Messages to the person running a stage: one line on stderr, printed above any progress bar (tqdm)."""
from __future__ import annotations

import sys

from tqdm import tqdm


def say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)
