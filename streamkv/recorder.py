"""What every runner shares: the result document around a computed spec's metrics, written through the store.

A runner (streamkv/runner.py for RunSpecs, streamkv/mit_runner.py for MIT's script) computes metrics and the
per-token NLL; `Recorder.record` adds what every result carries (streamkv/schema.py: kind, slot,
config_hash, spec, this machine's fingerprint, the creation time) and writes it atomically.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from . import fingerprint
from .store import Store, nll_bytes


class Recorder:
    kind = ""   # the result's kind (streamkv/schema.py), which each runner names

    def __init__(self, store: Store):
        self.store = store
        self._fingerprint: dict | None = None

    @property
    def fingerprint(self) -> dict:
        """This machine's environment, collected once per runner (it runs git and asks the GPU)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint.collect()
        return self._fingerprint

    def record(self, slot: str, spec, metrics: dict, nll: list[float], *, output: Path | None = None,
               cache_len: list[int] | None = None, repeats: list[dict] = (), **fields) -> Path:
        """Write `spec`'s result for `slot` (at `output` if given); `fields`: the kind's own keys, or a
        fingerprint of its own. Returns the JSON path."""
        result = {"kind": self.kind, "slot": slot, "config_hash": spec.config_hash(), "spec": spec.to_dict(),
                  "fingerprint": self.fingerprint, "metrics": metrics, **fields,
                  "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        return self.store.write(result, nll=nll_bytes(nll), cache_len=cache_len, repeats=repeats, path=output)
