"""`streamkv verify-assets`: the assets `streamkv fetch` wrote, or the demo's committed ones, checked offline.

It re-reads data/manifest.json without the network and names every missing or changed file. With
`--profile demo` (the image built with ASSETS=demo sets STREAMKV_PROFILE=demo) it checks the demo profile's
committed assets instead: data/demo/'s weights against the sha256 its train_config.json records, each
stream's text against its recorded sha256, and the config and tokenizer files by presence.

Kept apart from fetch.py, which the image's assets stage runs alone: that layer need not rebuild when a
check changes.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import click

from .fetch import (HOW_TO_FETCH, MANIFEST_NAME, MANIFEST_VERSION, PYTHIA_REPO, FetchError, one_line,
                    pinned_revision)
from .files import sha256_file

DEMO_DIR = "demo"
DEMO_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
HOW_TO_RESTORE_DEMO = "the demo assets ship with the repository: restore data/demo/ from it (git checkout -- data/demo)"


def find_snapshot(revision: str) -> Path:
    """The cached snapshot folder of the model at revision, without the network."""
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(PYTHIA_REPO, revision=revision, local_files_only=True))
    except OSError as err:
        raise FetchError(f"{PYTHIA_REPO}@{revision[:7]} is not in the Hugging Face cache "
                         f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); {HOW_TO_FETCH}") from err


def _check(path: Path, entry: dict, quick: bool) -> str | None:
    if not path.is_file():
        return f"missing: {path}"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"changed: {path}: {size} bytes, manifest says {entry['size']}"
    if not quick:
        got = sha256_file(path)
        if got != entry["sha256"]:
            return f"changed: {path}: sha256 {got[:12]}…, manifest says {entry['sha256'][:12]}…"
    return None


def verify(data_dir: Path, quick: bool = False) -> tuple[list[str], int]:
    """Check every file of the manifest: (one line per problem, number of files checked)."""
    manifest_path = data_dir / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FetchError(f"no asset manifest at {manifest_path}; {HOW_TO_FETCH}") from None
    except json.JSONDecodeError as err:
        raise FetchError(f"asset manifest {manifest_path} is not JSON ({err}); {HOW_TO_FETCH}") from None
    if manifest.get("schema_version") != MANIFEST_VERSION:
        raise FetchError(f"asset manifest {manifest_path} has schema_version {manifest.get('schema_version')}, "
                         f"this streamkv reads {MANIFEST_VERSION}; {HOW_TO_FETCH}")
    model = manifest["model"]
    if model["revision"] != pinned_revision():
        raise FetchError(f"the assets are {model['repo']}@{model['revision'][:7]} but this streamkv pins "
                         f"{pinned_revision()[:7]}; {HOW_TO_FETCH}")
    snapshot = find_snapshot(model["revision"])
    files = [(snapshot / name, entry) for name, entry in model["files"].items()]
    files += [(data_dir / name, entry) for name, entry in manifest["streams"].items()]
    problems = [p for p in (_check(path, entry, quick) for path, entry in files) if p]
    return problems, len(files)


def _text_check(path: Path) -> str | None:
    """A stream file whose text no longer matches the sha256 it records."""
    if not path.is_file():
        return f"missing: {path}"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        text, recorded = record["text"], record["sha256"]
    except (ValueError, KeyError, TypeError) as err:
        return f"changed: {path}: not a stream record ({one_line(err)})"
    got = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return None if got == recorded else f"changed: {path}: text sha256 {got[:12]}…, the file records {recorded[:12]}…"


def verify_demo(data_dir: Path, quick: bool = False) -> tuple[list[str], int]:
    """Check the demo profile's committed files: (one line per problem, number of files checked)."""
    demo = data_dir / DEMO_DIR
    train_config = demo / "train_config.json"
    try:
        weights = json.loads(train_config.read_text(encoding="utf-8"))["weights"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FetchError(f"the demo model's {train_config} cannot be read ({one_line(err)}); "
                         f"{HOW_TO_RESTORE_DEMO}") from None
    streams = sorted((demo / "streams").glob("*.json"))
    problems = [p for p in [_check(demo / weights["file"], {"size": weights["bytes"], "sha256": weights["sha256"]},
                                   quick),
                            *(None if (demo / name).is_file() else f"missing: {demo / name}" for name in DEMO_FILES),
                            *(_text_check(path) for path in streams)] if p]
    if not streams:
        problems.append(f"missing: {demo / 'streams'}/*.json")
    return problems, 2 + len(DEMO_FILES) + len(streams)



@click.command("verify-assets")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("data"),
              show_default=True, help="Directory holding manifest.json and the stream files.")
@click.option("--quick", is_flag=True, help="Check presence and size only (no sha256): for health checks.")
# Default paper, not the CLI's usual demo: these are the assets `fetch` writes. The image sets the env var.
@click.option("--profile", type=click.Choice(["paper", "demo"]), default="paper", show_default=True,
              envvar="STREAMKV_PROFILE",
              help="paper: data/manifest.json from fetch; demo: the committed data/demo/ [env STREAMKV_PROFILE].")
def verify_assets_command(data_dir: Path, quick: bool, profile: str) -> None:
    """Check the fetched assets against data/manifest.json (or the demo's), offline; one line per bad file."""
    if profile == "demo":
        (problems, n_files), source, remedy = verify_demo(data_dir, quick), data_dir / DEMO_DIR, HOW_TO_RESTORE_DEMO
    else:
        (problems, n_files), source, remedy = verify(data_dir, quick), data_dir / MANIFEST_NAME, HOW_TO_FETCH
    for line in problems:
        click.echo(line, err=True)
    if problems:
        raise FetchError(f"{len(problems)} of {n_files} asset files do not match {source}; {remedy}")
    click.echo(f"assets ok: {n_files} files match {source}" + (" (sizes only)" if quick else ""))
