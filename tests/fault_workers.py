"""Victims of the fault-injection tests (tests/test_faults.py), run as subprocesses and killed with -9.

    python tests/fault_workers.py write <results dir> <phase>   rewrite one slot, stop forever at <phase>
    python tests/fault_workers.py hold <lock file>              hold a streamkv lock forever

Each prints one line ("blocked" / "held") once it has reached the point where the test kills it.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from streamkv import files, locks
from streamkv.store import Store

from conftest import scored

SLOT = "main/long/lazy"
OLD_NLL = [1.0] * 7
NEW_NLL = [2.0] * 7


def write_parts(store: Store, config_hash: str, nll: list[float]) -> Path:
    raw, metrics = scored(nll)
    return store.write({"kind": "run", "slot": SLOT, "config_hash": config_hash, "spec": {}, "metrics": metrics},
                       nll=raw, cache_len=[len(nll), int(nll[0])], repeats=[{"tpot_ms": 1.0}, {"tpot_ms": 2.0}])


def _stop() -> None:
    print("blocked", flush=True)
    time.sleep(600)


def write(results: str, phase: str) -> None:
    """Rewrite SLOT with NEW_NLL, stopping at `phase`: inside the atomic write of the file whose name
    contains `phase` (temp written and fsynced, not yet renamed), or "tidy" (new JSON in place, the old
    result's artifacts not yet removed)."""
    store = Store(results)
    if phase == "tidy":
        tidy, calls = store._tidy, []

        def stop_second(path):   # the first call cleans up before writing, the second after
            calls.append(path)
            if len(calls) == 2:
                _stop()
            return tidy(path)

        store._tidy = stop_second
    else:
        replace = files.os.replace

        def stop_at(src, dst, **dir_fds):
            if phase in Path(dst).name:
                _stop()
            replace(src, dst, **dir_fds)

        files.os.replace = stop_at
    write_parts(store, "b" * 64, NEW_NLL)


def hold(lock: str) -> None:
    with locks.hold(Path(lock)):
        print("held", flush=True)
        time.sleep(600)


if __name__ == "__main__":
    {"write": write, "hold": hold}[sys.argv[1]](*sys.argv[2:])
