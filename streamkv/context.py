"""The stage context: what plans, execution and reports share.

`Context` is one command's settings, profile and store, with each dataset's DataSpec and MIT's reference
points resolved on first need; a `Point` is one slot of a plan (streamkv/plans.py) with the spec that fills
it, and `classify` gives its state in the store. `StageError` is a stage that cannot proceed as configured.

The tables and status paths plan without tokenizing (no model, no torch of ours): each stream's DataSpec
comes from the stream index that computing stages write (results/streams/{dataset}.json), valid while the
stream file, the model and the token budget are those it was made for.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from . import assets, console, mit, profiles
from .profiles import Dataset, Profile
from .settings import Settings
from .spec import DataSpec
from .store import Store


class StageError(ValueError):
    """A stage that cannot proceed as configured; the CLI prints it as one line."""


class Spec(Protocol):
    """What execution needs of a point's spec (a RunSpec, a mit.MitSpec): its hash, its stored form and the
    engine `status` lists; its stage's runner computes it (streamkv/experiments: Stage.runner)."""

    engine: str

    def config_hash(self) -> str: ...

    def to_dict(self) -> dict: ...


@dataclass(frozen=True)
class Point:
    slot: str
    spec: Spec | None         # None: the dataset's DataSpec is unknown (planning without tokenizing)
    display: str = ""         # the label tables and figures print for it
    value: int | None = None  # a sweep point's knob value
    stage: str = ""           # the stage that planned it (plans.plan): its runner computes it


# Here rather than with the other slot names in plans.py, which imports this module: Context.mit needs it
# (MIT's references record the main slots their sizes come from).
def variant_slot(stage: str, dataset: Dataset, label: str) -> str:
    return f"{stage}/{dataset.name}/{label}"


@dataclass
class Context:
    settings: Settings
    profile: Profile
    store: Store
    random_weights: bool = False
    tokenize: bool = True      # plans may tokenize streams the stream index does not know
    _data: dict = field(default_factory=dict)   # Dataset -> DataSpec | None, resolved on first need
    _mit: list | None = None                    # mit.plan(), made on first need

    def data(self, dataset: Dataset) -> DataSpec | None:
        """The dataset's DataSpec (None: unknown and not tokenized); a stage that never asks (MIT's
        reference, which reads the stream file itself) never loads a tokenizer."""
        if dataset not in self._data:
            self._data[dataset] = resolve_data(self.profile, dataset, self.store, tokenize=self.tokenize)
        return self._data[dataset]

    def mit(self) -> list:
        """MIT's reference points (mit.Planned), planned once: planning asks MIT's interpreter for versions."""
        if self._mit is None:
            self._mit = mit.plan(self.profile, self.settings, lambda d, label: variant_slot("main", d, label))
        return self._mit

    @property
    def model(self):
        return dataclasses.replace(self.profile.model, random_weights=self.random_weights)


def context(settings: Settings, *, tokenize: bool, random_weights: bool = False,
            profile: Profile | None = None) -> Context:
    profile = profile or profiles.resolve(settings)
    # A random-weights profile (paper-random) needs no flag: its every point is a timing run.
    return Context(settings, profile, Store(settings.results_dir), random_weights or profile.random_weights, tokenize)


def classify(ctx: Context, point: Point) -> str:
    """current | stale | missing (absent or unreadable) | unknown (no DataSpec to hash against)."""
    if point.spec is None:
        return "unknown"
    cell = ctx.store.lookup(point.slot, point.spec.config_hash(), allow_stale=True)
    if cell is None:
        return "missing"
    return "stale" if cell.stale else "current"


# ------------------------------------------------------------------------------------------ stream index
def _index_key(profile: Profile, dataset: Dataset) -> dict:
    """What a stream's DataSpec depends on. The file's sha256 is None when the file is absent (a machine that
    holds results/ but not the paper's assets): `make tex` still finds the entry by path and model."""
    file = Path(dataset.path) if Path(dataset.path).is_absolute() else assets.REPO / dataset.path
    return {"path": dataset.path, "file_sha256": assets.sha256_file(file) if file.is_file() else None,
            "max_tokens": dataset.max_tokens, "model": [profile.model.name, profile.model.revision],
            # A local checkpoint's revision pins only its weights; the ids also depend on its tokenizer.
            "tokenizer_sha256": assets.tokenizer_sha256(profile.model)}


def _matches(stored: dict, key: dict) -> bool:
    if key["file_sha256"] is None:   # file absent: the newest entry for the same path, budget and model
        return {**stored, "file_sha256": None} == key
    return stored == key


def resolve_data(profile: Profile, dataset: Dataset, store: Store, *, tokenize: bool) -> DataSpec | None:
    """The dataset's DataSpec: from the stream index when it is valid, else by tokenizing (if allowed)."""
    index = store.root / "streams" / f"{dataset.name}.json"
    key = _index_key(profile, dataset)
    try:
        entries = store.tree.read_json(index)["entries"]
        for entry in reversed(entries):
            if _matches(entry["key"], key):
                return DataSpec(**entry["data"])
    except FileNotFoundError:
        entries = []
    except (OSError, ValueError, KeyError, TypeError) as err:
        # The index is a cache, never a source of truth, but without it `tables` and `status` cannot tell
        # current results from stale ones: say which file is broken (a stage run rewrites it).
        console.say(f"warning: stream index {index} is unreadable ({type(err).__name__}: {err}); "
            f"{dataset.name} results cannot be matched until a stage re-tokenizes the stream")
        entries = []
    if not tokenize:
        return None
    synthetic = dataset.path.startswith(assets.SYNTHETIC_PREFIX)  # random ids: no tokenizer to load
    tokenizer = None if synthetic else assets.load_tokenizer(profile.model)
    _, data = assets.load_stream(dataset.name, dataset.path, tokenizer, dataset.max_tokens)
    if key["file_sha256"] is not None or synthetic:
        # Every key stays (the file is a few lines per token budget): evicting the stages' own entry would
        # leave `make tex` without the DataSpecs it needs to recognise current results. A synthetic stream
        # has no file (its key's sha256 is None) and is indexed too: generating its ids needs torch, which
        # `make tex` never loads, so without an entry every paper-random cell would read as stale.
        entries = [e for e in entries if e.get("key") != key] + [{"key": key, "data": dataclasses.asdict(data)}]
        store.tree.write(index, json.dumps({"entries": entries}, indent=2).encode())
    return data
