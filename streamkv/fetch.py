"""`streamkv fetch`: the paper profile's assets, fetched once (streamkv/verify.py checks them offline).

fetch is the only code in streamkv that uses the network. It runs in the image's assets stage (or by hand
on a machine with network access) and writes:

- the EleutherAI/pythia-2.8b snapshot at a pinned commit into the Hugging Face cache (`HF_HOME`):
  safetensors weights, config and tokenizer files only, never pickle (`.bin`) weights;
- `data/pg19/long_context_<N>.json` and `data/wikitext/long_context_<M>.json`: the evaluation streams,
  presampled once from the PG19 and WikiText-103 test splits so that every run reads the same text;
- `data/manifest.json`: size and sha256 of every one of those files. Model files are listed relative to
  the snapshot folder, whose location depends on `HF_HOME` and so differs between machines; streams are
  listed relative to the data directory.

The pinned sources (every revision is a commit of the hub repository):
- EleutherAI/pythia-2.8b @ 2a259cdd…: the repository's `main` branch commit; its model.safetensors
  (5,684,693,096 bytes) has the LFS sha256 in PUBLISHED_SHA256. Both facts come from public records of
  the hub's metadata (file listings by revision); fetch checks the weights against that sha256.
- PG19: emozilla/pg19, a parquet copy of deepmind/pg19 with the same columns (short_book_title,
  publication_date, url, text). deepmind/pg19 itself is a loading script, which `datasets` >= 4 refuses.
- WikiText-103: Salesforce/wikitext (the hub's canonical `wikitext`), config wikitext-103-raw-v1.
Only the test split's files are downloaded (`data_files`); `datasets` would otherwise fetch every split.

The samples, by default the text the paper evaluated:
- PG19: the test book titled "Dragon's blood by Henry Milner Rideout" (selected by the title metadata,
  not by position), from its first character to the first line end at which the text holds at least
  PG19_SAMPLE_LENGTH tokens.
- WikiText-103: "row 84". A row of the hub's wikitext is one line of the original file (a paragraph, a
  heading, or an empty string for a blank line), far shorter than 4096 tokens. We read "row 84" as the
  start: the sample is rows 84, 85, ... of the wikitext-103-raw-v1 test split, concatenated as stored
  (each non-empty row already ends in a newline), up to the first row at which the text holds at least
  WIKITEXT_SAMPLE_LENGTH tokens. The start row is the `--wikitext-row` option.
Token counts use the fetched tokenizer.json through `tokenizers`, without special tokens.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import click

# The only package import allowed here: the image's assets stage copies in just __init__.py, this module
# and files.py (stdlib only). sha256_file is re-exported for callers that take it from here.
from .files import atomic_write, sha256_file

PYTHIA_REPO = "EleutherAI/pythia-2.8b"
PYTHIA_REVISION = "2a259cdd96a4beb1cdf467512e3904197345f6a9"
REVISION_ENV = "STREAMKV_PYTHIA_REVISION"    # the image sets it from its PYTHIA_REVISION build arg
# Published LFS sha256 per revision and file; a download that differs is refused, not recorded.
PUBLISHED_SHA256 = {
    PYTHIA_REVISION: {"model.safetensors": "ab496f1c3fd79e3c749a9d5414136a2c8e4224f94eecb261970315cdb0f813fe"},
}
# Everything from_pretrained needs for weights, config and tokenizer; nothing that unpickles.
MODEL_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class DatasetSource:
    repo: str
    config: str | None     # recorded for provenance; the split is read through `data_files`
    revision: str
    split: str
    data_files: str        # the split's files inside the repository at `revision`


PG19 = DatasetSource("emozilla/pg19", None, "c021754c8e01c5b1cc83a1f549c1f97fbbb756b8", "test",
                     "data/test-*.parquet")
WIKITEXT = DatasetSource("Salesforce/wikitext", "wikitext-103-raw-v1", "b08601e04326c79dfdd32d625aee71d232d685c3",
                         "test", "wikitext-103-raw-v1/test-*.parquet")
PG19_BOOK_TITLE = "Dragon's blood by Henry Milner Rideout"
WIKITEXT_ROW = 84
PG19_SAMPLE_LENGTH = 50000
WIKITEXT_SAMPLE_LENGTH = 4096
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
HOW_TO_FETCH = "run `streamkv fetch` on a machine with network access, or use the streamkv image (assets baked in)"
# The demo profile's assets ship with the repository (and every image), under data/demo/.


class FetchError(RuntimeError):
    """An asset that cannot be fetched or found; the message is one line and says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def pg19_file(n_tokens: int) -> str:
    return f"pg19/long_context_{n_tokens}.json"


def wikitext_file(n_tokens: int) -> str:
    return f"wikitext/long_context_{n_tokens}.json"


def check_revision(revision: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{40}", revision):
        raise FetchError(f"model revision must be a 40-hex commit hash (a branch name moves), got {revision!r}")
    return revision


def pinned_revision() -> str:
    """The Pythia commit this installation uses: $STREAMKV_PYTHIA_REVISION (the image's) or the default."""
    return check_revision(os.environ.get(REVISION_ENV) or PYTHIA_REVISION)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def write_json_atomic(path: Path, obj: dict) -> None:
    atomic_write(path, (json.dumps(obj, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))


# ---------------------------------------------------------------------------------------------- network


def download_model(revision: str) -> Path:
    import huggingface_hub  # imported here: the CLI loads this module for every command

    try:
        snapshot = Path(huggingface_hub.snapshot_download(PYTHIA_REPO, revision=revision,
                                                          allow_patterns=list(MODEL_PATTERNS)))
    except OSError as err:  # every hub and connection error is an OSError subclass
        raise FetchError(f"cannot download {PYTHIA_REPO}@{revision[:7]} from the Hugging Face Hub "
                         f"({one_line(err)}); {HOW_TO_FETCH}") from err
    if not any(snapshot.glob("*.safetensors")):
        raise FetchError(f"{PYTHIA_REPO}@{revision[:7]} has no safetensors weights; pickle weights are "
                         "never loaded, so pick a revision that has model*.safetensors")
    return snapshot


def check_published(revision: str, files: dict) -> None:
    """Refuse downloaded files whose sha256 differs from the one published for that revision."""
    for name, expected in PUBLISHED_SHA256.get(revision, {}).items():
        got = files.get(name, {}).get("sha256", "missing")
        if got != expected:
            raise FetchError(f"{PYTHIA_REPO}@{revision[:7]}/{name} has sha256 {got[:12]}…, the published "
                             f"file has {expected[:12]}…: corrupt download or a wrong pin in streamkv/fetch.py")


def load_split(source: DatasetSource):
    import datasets

    try:
        return datasets.load_dataset(source.repo, revision=source.revision, split=source.split,
                                     data_files={source.split: source.data_files})
    except OSError as err:  # ConnectionError, DatasetNotFoundError, hub errors
        raise FetchError(f"cannot download {source.repo}@{source.revision[:7]} ({source.split}) "
                         f"({one_line(err)}); {HOW_TO_FETCH}") from err


# ---------------------------------------------------------------------------------------------- samples


class TokenCounter:
    def __init__(self, tokenizer_json: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(tokenizer_json))

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def char_end_of_token(self, text: str, n_tokens: int) -> int | None:
        """Character offset where the first n_tokens tokens of text end; None if text is shorter."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.offsets[n_tokens - 1][1] if len(enc.ids) >= n_tokens else None


def _normal_title(title: str) -> str:
    return " ".join(title.replace("\u2019", "'").split()).casefold()


def find_book(dataset, title: str) -> int:
    """Row index of the one book whose short_book_title is title (case, spacing and ’ vs ' ignored)."""
    want = _normal_title(title)
    titles = list(dataset["short_book_title"])
    hits = [i for i, t in enumerate(titles) if _normal_title(t) == want]
    if len(hits) != 1:
        found = "no book" if not hits else f"{len(hits)} books (rows {hits})"
        near = [t for t in titles if want.split()[0] in _normal_title(t)][:3] if want else []
        raise FetchError(f"PG19 {PG19.split} split ({PG19.repo}@{PG19.revision[:7]}) has {found} titled "
                         f"{title!r}{f' (similar: {near})' if near else ''}; pass --pg19-title with a "
                         "short_book_title of that split")
    return hits[0]


def book_prefix(text: str, counter: TokenCounter, min_tokens: int) -> tuple[str, int]:
    """The book's opening up to the first line end that holds >= min_tokens tokens, and its token count.

    Cutting at a line end keeps a word from being split, so the prefix tokenizes like the book does."""
    end = counter.char_end_of_token(text, min_tokens)
    if end is None:
        raise FetchError(f"the PG19 book has only {counter.count(text)} tokens, fewer than {min_tokens}")
    while True:
        newline = text.find("\n", end)
        cut = len(text) if newline < 0 else newline + 1
        n_tokens = counter.count(text[:cut])
        if n_tokens >= min_tokens or cut == len(text):
            return text[:cut], n_tokens
        end = cut


def row_run(rows: list[str], start: int, counter: TokenCounter, min_tokens: int) -> tuple[str, int, int]:
    """Rows start, start+1, ... concatenated until >= min_tokens tokens: (text, end row exclusive, tokens)."""
    if not 0 <= start < len(rows):
        raise FetchError(f"WikiText row {start} is out of range: the {WIKITEXT.split} split has {len(rows)} rows")
    for end in range(start + 1, len(rows) + 1):
        text = "".join(rows[start:end])
        n_tokens = counter.count(text)
        if n_tokens >= min_tokens:
            return text, end, n_tokens
    raise FetchError(f"WikiText rows {start}.. hold only {n_tokens} tokens, fewer than {min_tokens}")


def stream_record(text: str, source: str, dataset: DatasetSource, selection: dict, revision: str,
                  n_tokens: int, min_tokens: int) -> dict:
    """The stream file: the keys streamkv.assets reads, then provenance, then the text itself."""
    return {"source": source, "n_chars": len(text), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "dataset": dataset.repo, "dataset_config": dataset.config, "dataset_revision": dataset.revision,
            "split": dataset.split, **selection, "tokenizer": PYTHIA_REPO, "tokenizer_revision": revision,
            "n_tokens": n_tokens, "min_tokens": min_tokens, "text": text}


def sample_pg19(counter: TokenCounter, revision: str, title: str, min_tokens: int) -> dict:
    dataset = load_split(PG19)
    row = dataset[find_book(dataset, title)]
    text, n_tokens = book_prefix(row["text"], counter, min_tokens)
    selection = {"book_title": row["short_book_title"], "publication_date": row.get("publication_date"),
                 "url": row.get("url")}
    source = f"PG19 test book {row['short_book_title']!r}, opening {n_tokens} tokens"
    return stream_record(text, source, PG19, selection, revision, n_tokens, min_tokens)


def sample_wikitext(counter: TokenCounter, revision: str, start: int, min_tokens: int) -> dict:
    rows = list(load_split(WIKITEXT)["text"])
    text, end, n_tokens = row_run(rows, start, counter, min_tokens)
    source = f"WikiText-103 test rows {start}..{end - 1} ({WIKITEXT.config}), {n_tokens} tokens"
    return stream_record(text, source, WIKITEXT, {"row_start": start, "row_end": end}, revision,
                         n_tokens, min_tokens)


# --------------------------------------------------------------------------------------------- manifest


def _entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def file_entries(root: Path, names=None) -> dict:
    """{relative name: size and sha256} of the given files under root, or of every file there."""
    paths = sorted(p for p in root.rglob("*") if p.is_file()) if names is None else [root / n for n in sorted(names)]
    return {p.relative_to(root).as_posix(): _entry(p) for p in paths}


def fetch(data_dir: Path, revision: str, pg19_title: str = PG19_BOOK_TITLE, wikitext_row: int = WIKITEXT_ROW,
          pg19_tokens: int = PG19_SAMPLE_LENGTH, wikitext_tokens: int = WIKITEXT_SAMPLE_LENGTH) -> dict:
    """Download, presample and write the manifest; returns the manifest."""
    check_revision(revision)
    snapshot = download_model(revision)
    model_files = file_entries(snapshot)  # hashes the weights once, for the check and the manifest
    check_published(revision, model_files)
    counter = TokenCounter(snapshot / "tokenizer.json")
    streams = {pg19_file(pg19_tokens): sample_pg19(counter, revision, pg19_title, pg19_tokens),
               wikitext_file(wikitext_tokens): sample_wikitext(counter, revision, wikitext_row, wikitext_tokens)}
    for name, record in streams.items():
        write_json_atomic(data_dir / name, record)
    manifest = {"schema_version": MANIFEST_VERSION, "written_by": "streamkv fetch",
                "model": {"repo": PYTHIA_REPO, "revision": revision, "files": model_files},
                "streams": file_entries(data_dir, streams)}
    write_json_atomic(data_dir / MANIFEST_NAME, manifest)
    return manifest


# ------------------------------------------------------------------------------------------------- CLI


@click.command("fetch")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("data"),
              show_default=True, help="Where the stream files and manifest.json go.")
@click.option("--revision", default=None, help=f"Pythia commit (40 hex) [default: ${REVISION_ENV} or {PYTHIA_REVISION}]")
@click.option("--pg19-title", default=PG19_BOOK_TITLE, show_default=True, help="PG19 test book (short_book_title).")
# The sample lengths name the stream files the paper profile looks for, so fetch reads the same knobs from
# the environment (the image build passes them as build args; .env is a run-time file and is not read here).
@click.option("--pg19-tokens", type=click.IntRange(min=1), default=PG19_SAMPLE_LENGTH, show_default=True,
              envvar="PG19_SAMPLE_LENGTH", help="Keep at least this many tokens of the book [env PG19_SAMPLE_LENGTH].")
@click.option("--wikitext-row", type=click.IntRange(min=0), default=WIKITEXT_ROW, show_default=True,
              help="First WikiText-103 test row of the sample.")
@click.option("--wikitext-tokens", type=click.IntRange(min=1), default=WIKITEXT_SAMPLE_LENGTH, show_default=True,
              envvar="WIKITEXT_SAMPLE_LENGTH",
              help="Keep at least this many tokens of rows [env WIKITEXT_SAMPLE_LENGTH].")
def fetch_command(data_dir: Path, revision: str | None, pg19_title: str, pg19_tokens: int, wikitext_row: int,
                  wikitext_tokens: int) -> None:
    """Download the paper's model and datasets (needs network), presample the streams, write the manifest."""
    # A FetchError propagates: `streamkv`'s group prints it as one line and exits 2 (see __main__ below).
    manifest = fetch(data_dir, revision or pinned_revision(), pg19_title, wikitext_row, pg19_tokens,
                     wikitext_tokens)
    model = manifest["model"]
    click.echo(f"model: {model['repo']}@{model['revision']} ({len(model['files'])} files)")
    for name in manifest["streams"]:
        click.echo(f"stream: {data_dir / name}")
    click.echo(f"manifest: {data_dir / MANIFEST_NAME}")


if __name__ == "__main__":
    # The image's assets stage runs this file alone (`python -m streamkv.fetch`), with no other module of
    # the package copied in, so that editing the rest of streamkv does not invalidate the multi-GB layer.
    try:
        fetch_command()
    except FetchError as err:   # the same one line and exit code as `streamkv fetch`
        click.echo(f"streamkv: error: {' '.join(str(err).split())}", err=True)
        raise SystemExit(2) from None
