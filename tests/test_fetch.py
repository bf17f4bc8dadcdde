"""streamkv fetch / verify-assets offline: a fake hub snapshot and tiny datasets made here, no network."""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import huggingface_hub
import pytest
from click.testing import CliRunner
from huggingface_hub.errors import LocalEntryNotFoundError
from tokenizers import Tokenizer, models, pre_tokenizers

from streamkv import cli, fetch as F

REV = "0123456789abcdef0123456789abcdef01234567"
ROOT = Path(__file__).resolve().parents[1]


def book(name: str, n_lines: int) -> str:
    return "".join(f"{name} line {i} walks the harbour road to town .\n" for i in range(n_lines))


# 10 tokens a line under the whitespace tokenizer below: "<w> line <i> walks the harbour road to town ."
PG19_ROWS = {
    "short_book_title": ["Travels in Morocco Volume 2 by James Richardson", "Dragon\u2019s Blood by Henry  Milner Rideout"],
    "publication_date": [1860, 1909],
    "url": ["http://www.gutenberg.org/ebooks/10356", "http://www.gutenberg.org/ebooks/10321"],
    "text": [book("morocco", 80), book("dragon", 80)],
}
WIKI_ROWS = ["" if i % 5 == 0 else f" = row {i} = \n" if i % 5 == 1 else f" paragraph of row {i} .\n"
             for i in range(120)]


def make_tokenizer(path: Path) -> None:
    words = {w for text in PG19_ROWS["text"] + WIKI_ROWS for w in text.split()}
    vocab = {w: i for i, w in enumerate(["[UNK]", *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake hub: a remote repo folder, a cache of snapshots, and the calls made to them."""
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text('{"model_type": "gpt_neox"}')
    (remote / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    (remote / "pytorch_model.bin").write_bytes(b"pickle weights")
    (remote / "tokenizer_config.json").write_text("{}")
    (remote / "README.md").write_text("model card")
    make_tokenizer(remote / "tokenizer.json")
    cache = tmp_path / "hf-cache"
    calls = {"snapshot": [], "datasets": []}

    def snapshot_download(repo_id, *, revision, allow_patterns=None, local_files_only=False, **kw):
        calls["snapshot"].append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns,
                                  "local_files_only": local_files_only})
        snap = cache / repo_id / revision
        if local_files_only:
            if not snap.is_dir():
                raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache.\nSecond line.")
            return str(snap)
        snap.mkdir(parents=True, exist_ok=True)
        for src in remote.iterdir():
            if any(fnmatch.fnmatch(src.name, p) for p in allow_patterns):
                shutil.copy(src, snap / src.name)
        return str(snap)

    def load_dataset(path, *, revision, split, data_files, **kw):
        calls["datasets"].append({"path": path, "revision": revision, "split": split, "data_files": data_files})
        rows = {"emozilla/pg19": PG19_ROWS, "Salesforce/wikitext": {"text": WIKI_ROWS}}[path]
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.delenv(F.REVISION_ENV, raising=False)
    return {"cache": cache, "calls": calls, "snapshot": cache / F.PYTHIA_REPO / REV}


def run_fetch(data_dir: Path, *extra: str):
    args = ["--data-dir", str(data_dir), "--revision", REV, "--pg19-tokens", "95", "--wikitext-tokens", "40", *extra]
    return CliRunner().invoke(cli.main, ["fetch", *args])


def run_verify(data_dir: Path, *extra: str):
    # The profile defaults to paper; an inherited STREAMKV_PROFILE must not change that here.
    return CliRunner().invoke(cli.main, ["verify-assets", "--data-dir", str(data_dir), *extra],
                              env={"STREAMKV_PROFILE": None})


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def test_fetch_presamples_the_papers_texts_and_verifies(hub, tmp_path, monkeypatch):
    data = tmp_path / "data"
    result = run_fetch(data)
    assert result.exit_code == 0, result.output

    pg19 = json.loads((data / "pg19/long_context_95.json").read_text())
    dragon = PG19_ROWS["text"][1]
    assert pg19["book_title"] == PG19_ROWS["short_book_title"][1]         # chosen by title, not by row 0
    assert dragon.startswith(pg19["text"]) and pg19["text"].endswith("\n")
    assert pg19["text"].count("\n") == 10                                    # 95 tokens: the 10th line's end
    assert pg19["n_tokens"] == 100 and pg19["min_tokens"] == 95
    assert pg19["sha256"] == hashlib.sha256(pg19["text"].encode()).hexdigest()
    assert pg19["n_chars"] == len(pg19["text"])
    assert (pg19["dataset"], pg19["dataset_revision"], pg19["split"]) == ("emozilla/pg19", F.PG19.revision, "test")
    assert (pg19["tokenizer"], pg19["tokenizer_revision"]) == (F.PYTHIA_REPO, REV)

    wiki = json.loads((data / "wikitext/long_context_40.json").read_text())
    assert wiki["row_start"] == 84 and wiki["text"] == "".join(WIKI_ROWS[84:wiki["row_end"]])
    assert wiki["n_tokens"] >= 40 > len("".join(WIKI_ROWS[84:wiki["row_end"] - 1]).split())
    assert wiki["dataset_config"] == "wikitext-103-raw-v1"

    # Only the test split's files, at the pinned revisions; only safetensors/config/tokenizer files.
    assert {(c["path"], c["revision"], c["split"]) for c in hub["calls"]["datasets"]} == {
        ("emozilla/pg19", F.PG19.revision, "test"), ("Salesforce/wikitext", F.WIKITEXT.revision, "test")}
    assert all(list(c["data_files"]) == ["test"] and "test" in c["data_files"]["test"] for c in hub["calls"]["datasets"])
    manifest = json.loads((data / "manifest.json").read_text())
    assert sorted(manifest["model"]["files"]) == ["config.json", "model.safetensors", "tokenizer.json",
                                                  "tokenizer_config.json"]
    assert sorted(manifest["streams"]) == ["pg19/long_context_95.json", "wikitext/long_context_40.json"]

    monkeypatch.setenv(F.REVISION_ENV, REV)
    result = run_verify(data)
    assert result.exit_code == 0 and "assets ok: 6 files" in result.output, result.output


def test_manifest_catches_a_flipped_byte_and_a_missing_file(hub, tmp_path, monkeypatch):
    data = tmp_path / "data"
    assert run_fetch(data).exit_code == 0
    monkeypatch.setenv(F.REVISION_ENV, REV)
    weights = hub["snapshot"] / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[1000] ^= 0x01
    weights.write_bytes(bytes(raw))
    (data / "wikitext/long_context_40.json").unlink()

    result = run_verify(data)
    assert result.exit_code != 0
    lines = error_lines(result)
    assert any(line.startswith("changed:") and "model.safetensors" in line for line in lines), lines
    assert any(line.startswith("missing:") and "long_context_40.json" in line for line in lines), lines
    assert result.exit_code == 2
    assert lines[-1].startswith("streamkv: error: 2 of 6 asset files") and "streamkv fetch" in lines[-1]

    # --quick (the health check) compares sizes: it sees the missing file, not the same-size flip.
    quick = error_lines(run_verify(data, "--quick"))
    assert [line.split(":")[0] for line in quick[:-1]] == ["missing"]


def test_no_network_is_one_line_naming_fetch(hub, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub,\n"
                                      "and we cannot find the appropriate snapshot folder.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    result = run_fetch(tmp_path / "data")
    assert result.exit_code == 2
    assert len(error_lines(result)) == 1, result.output
    assert "streamkv fetch" in result.output and "LocalEntryNotFoundError" in result.output
    assert error_lines(result)[0].startswith("streamkv: error: ")
    assert "Traceback" not in result.output


def test_no_assets_is_one_line_naming_fetch(hub, tmp_path, monkeypatch):
    result = run_verify(tmp_path / "nothing-here")
    assert result.exit_code == 2 and len(error_lines(result)) == 1 and "streamkv fetch" in result.output

    # A manifest whose model snapshot is not in this machine's cache.
    data = tmp_path / "data"
    assert run_fetch(data).exit_code == 0
    monkeypatch.setenv(F.REVISION_ENV, REV)
    shutil.rmtree(hub["snapshot"])
    result = run_verify(data)
    assert result.exit_code == 2 and len(error_lines(result)) == 1, result.output
    assert "not in the Hugging Face cache" in result.output and "streamkv fetch" in result.output


def test_real_hub_client_offline_gives_one_line(tmp_path):
    """The real huggingface_hub with HF_HUB_OFFLINE=1 and an empty cache: the path a reviewer without
    network takes. It must end in our one line, not the hub's traceback."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "streamkv.fetch", "--data-dir", str(tmp_path / "data")],
                          env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"streamkv: error: cannot download {F.PYTHIA_REPO}@2a259cd")
    assert "streamkv fetch" in proc.stderr


def test_book_is_selected_by_title_or_refused(hub, tmp_path):
    result = run_fetch(tmp_path / "data", "--pg19-title", "The Missing Book")
    assert result.exit_code == 2 and len(error_lines(result)) == 1
    assert "no book titled 'The Missing Book'" in result.output
    result = run_fetch(tmp_path / "data", "--pg19-title", "Dragon's blood")
    assert result.exit_code == 2 and "similar: ['Dragon\u2019s Blood by Henry Milner Rideout']" in result.output


def test_too_short_samples_and_bad_rows_are_refused(hub, tmp_path):
    result = run_fetch(tmp_path / "a", "--pg19-tokens", "100000")
    assert result.exit_code == 2 and "fewer than 100000" in result.output
    result = run_fetch(tmp_path / "b", "--wikitext-row", "500")
    assert result.exit_code == 2 and "row 500 is out of range" in result.output


def test_revision_must_be_a_commit(hub, tmp_path, monkeypatch):
    result = CliRunner().invoke(cli.main, ["fetch", "--data-dir", str(tmp_path), "--revision", "main"])
    assert result.exit_code == 2 and "40-hex commit" in result.output
    monkeypatch.setenv(F.REVISION_ENV, "v1.0")
    with pytest.raises(F.FetchError, match="40-hex"):
        F.pinned_revision()
    assert hub["calls"]["snapshot"] == []


def test_weights_that_differ_from_the_published_sha256_are_refused(hub, tmp_path, monkeypatch):
    monkeypatch.setitem(F.PUBLISHED_SHA256, REV, {"model.safetensors": "0" * 64})
    result = run_fetch(tmp_path / "data")
    assert result.exit_code == 2 and "published file has 000000000000" in result.output
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_load_split_reads_only_the_test_files_of_a_multi_config_repo(tmp_path, monkeypatch):
    """The real `datasets` on a local copy of wikitext's layout (several configs in the card, train
    files that are not even parquet): our call shape must read the test split's files and nothing else."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "wikitext"
    (repo / "wikitext-103-raw-v1").mkdir(parents=True)
    pq.write_table(pa.table({"text": [" = A = \n", "", " b .\n"]}), repo / "wikitext-103-raw-v1/test-00000-of-00001.parquet")
    (repo / "wikitext-103-raw-v1/train-00000-of-00002.parquet").write_bytes(b"never read")
    (repo / "README.md").write_text("---\nconfigs:\n"
                                    "- config_name: wikitext-103-raw-v1\n  data_files:\n"
                                    "  - {split: test, path: wikitext-103-raw-v1/test-*}\n"
                                    "  - {split: train, path: wikitext-103-raw-v1/train-*}\n"
                                    "- config_name: wikitext-2-raw-v1\n  data_files:\n"
                                    "  - {split: test, path: wikitext-2-raw-v1/test-*}\n---\n")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    source = F.DatasetSource(str(repo), F.WIKITEXT.config, F.WIKITEXT.revision, "test", F.WIKITEXT.data_files)
    assert list(F.load_split(source)["text"]) == [" = A = \n", "", " b .\n"]


def test_pickle_weights_are_never_requested():
    assert not any(fnmatch.fnmatch(name, p) for p in F.MODEL_PATTERNS
                   for name in ("pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt"))
    assert any(fnmatch.fnmatch("model.safetensors", p) for p in F.MODEL_PATTERNS)


def test_verify_assets_of_the_demo_profile_checks_the_committed_files(tmp_path):
    """--profile demo (the demo image's default through STREAMKV_PROFILE): data/demo/'s weights against
    train_config.json's sha256, each stream's text against its own, the tokenizer and config by presence."""
    shutil.copytree(ROOT / "data/demo", tmp_path / "demo")
    ok = run_verify(tmp_path, "--profile", "demo")
    assert (ok.exit_code, ok.output) == (0, f"assets ok: 7 files match {tmp_path / 'demo'}\n")

    weights = tmp_path / "demo/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\1")                  # same size, other bytes
    stream = tmp_path / "demo/streams/demo-short.json"
    record = json.loads(stream.read_text())
    stream.write_text(json.dumps({**record, "text": record["text"] + " "}))
    (tmp_path / "demo/tokenizer.json").unlink()
    bad = run_verify(tmp_path, "--profile", "demo")
    assert bad.exit_code == 2
    lines = error_lines(bad)
    assert lines[0].startswith(f"changed: {weights}: sha256 ")
    assert lines[1] == f"missing: {tmp_path / 'demo/tokenizer.json'}"
    assert lines[2].startswith(f"changed: {stream}: text sha256 ")
    assert lines[3] == (f"streamkv: error: 3 of 7 asset files do not match {tmp_path / 'demo'}; the demo assets "
                        "ship with the repository: restore data/demo/ from it (git checkout -- data/demo)")
    # --quick: sizes only, so the same-size weights pass; the text check is cheap and always done.
    assert len(error_lines(run_verify(tmp_path, "--profile", "demo", "--quick"))) == 3
