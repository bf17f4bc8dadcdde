"""Environment fingerprint: what it records, and that dtypes compare as dtypes."""
from __future__ import annotations

import json
import platform

import pytest
import torch

from streamkv import fingerprint


@pytest.mark.parametrize("a, b", [("torch.float16", "float16"), (torch.float16, "float16"),
                                  ("torch.bfloat16", torch.bfloat16)])
def test_dtype_spellings_are_one_dtype(a, b):
    assert fingerprint.compare({"dtype": a}, {"dtype": b}) == []


def test_mismatches_are_named():
    a = {"gpu_name": "NVIDIA A800", "torch": "2.5.1", "cuda": "12.4", "transformers": "4.57.3",
         "dtype": "torch.float16", "python": "3.10"}
    b = {"gpu_name": "NVIDIA H100", "torch": "2.5.1", "cuda": "12.4", "transformers": "5.24.0", "dtype": "bfloat16",
         "python": "3.11"}
    problems = fingerprint.compare(a, b)
    assert problems == ["gpu_name: NVIDIA A800 vs NVIDIA H100", "transformers: 4.57.3 vs 5.24.0",
                        "dtype: float16 vs bfloat16"]  # python is not a timing-relevant key


def test_collect_records_the_environment_without_the_hostname():
    fp = fingerprint.collect()
    for key in ("git_commit", "git_dirty", "python", "platform", "torch", "cuda", "cudnn", "transformers",
                "datasets", "tokenizers", "gpu_name", "gpu_driver", "device_count"):
        assert key in fp
    assert fp["torch"] == torch.__version__
    json.dumps(fp)  # goes into result JSON as is
    # (a substring check would trip on short hostnames that occur in CPU names)
    assert platform.node() not in fp.values() and platform.node() not in fp["platform"].split("-")


def test_collect_outside_a_git_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "REPO", tmp_path)
    fp = fingerprint.collect()
    assert fp["git_commit"] is None and fp["git_dirty"] is None


def test_image_without_git_names_its_build_commit(monkeypatch):
    from streamkv import fingerprint as fp

    monkeypatch.setattr(fp, "_run", lambda *cmd: None)   # no git binary, no .git: as in the image
    monkeypatch.setenv("STREAMKV_GIT_COMMIT", "a" * 40)
    monkeypatch.setenv("STREAMKV_GIT_DIRTY", "1")
    assert fp._git() == ("a" * 40, True)
    monkeypatch.delenv("STREAMKV_GIT_COMMIT")
    monkeypatch.delenv("STREAMKV_GIT_DIRTY")
    assert fp._git() == (None, None)
