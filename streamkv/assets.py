"""Models, tokenizers and token streams, from local files only.

Nothing here ever downloads: hub models are read from the local Hugging Face cache with
local_files_only=True, demo assets from the repository (data/demo/). A missing or corrupted asset raises
AssetError, one line that names the command fetching it (`streamkv fetch`, run at image build, where the
network exists). The CLI prints it without a traceback.

Model names: an existing directory (absolute, or relative to the repository root) is a local checkpoint
whose revision is the sha256 of its model.safetensors, checked on load; anything else is a hub id at a
pinned revision.

No checkpoint code ever runs: every transformers loader gets trust_remote_code=False, and before any of
them is called `refuse_remote_code` rejects a checkpoint whose config or tokenizer config maps classes to
its own Python files (`auto_map`), in one line. (Left unset, transformers asks on a terminal and runs the
checkpoint's configuration, tokenizer and modelling code on "y".)

torch and transformers are imported inside the loaders only: the CLI, the stage planner and the table
generators use this module's paths and errors and must not pay for (or require) torch.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from streamkv.files import sha256_file
from streamkv.spec import DataSpec, ModelSpec, SpecError

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "data" / "demo"
DEMO_STREAMS = {"demo-long": "data/demo/streams/demo-long.json", "demo-short": "data/demo/streams/demo-short.json"}
# Architectures committed with the package, so random-weights (timing) runs need no download.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SYNTHETIC_PREFIX = "synthetic:"
FETCH_HINT = ("fetch assets with `streamkv fetch` (the image build runs it); "
              "demo assets are committed under data/demo/")


class AssetError(RuntimeError):
    """A model, tokenizer or stream that is missing or corrupted locally; the CLI prints it as one line."""


def _missing(what: str, where) -> AssetError:
    return AssetError(f"{what} not found: {where}; {FETCH_HINT}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO / p


def _relative(path: Path) -> str:
    """Repository-relative form, so a spec (and its config_hash) does not depend on the checkout location."""
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def _local_dir(spec: ModelSpec) -> Path | None:
    path = _resolve(spec.name)
    return path if path.is_dir() else None


def tokenizer_sha256(spec: ModelSpec) -> str | None:
    """sha256 of a local checkpoint's tokenizer.json (a hub model's tokenizer is pinned by its revision)."""
    local = _local_dir(spec)
    file = None if local is None else local / "tokenizer.json"
    return sha256_file(file) if file is not None and file.is_file() else None


# ------------------------------------------------------------------------------------------- remote code
_CODE_CONFIGS = ("config.json", "tokenizer_config.json")


def _cached_snapshot(spec: ModelSpec) -> Path | None:
    """The local hub cache's snapshot folder of a hub model, if its config is there (no network)."""
    import huggingface_hub

    found = huggingface_hub.try_to_load_from_cache(spec.name, "config.json", revision=spec.revision)
    return Path(found).parent if isinstance(found, str) else None


def refuse_remote_code(folder: Path | None, name: str) -> None:
    """AssetError when the checkpoint in `folder` declares code of its own (`auto_map`)."""
    for file in (_CODE_CONFIGS if folder is not None else ()):
        try:
            doc = json.loads((folder / file).read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            raise AssetError(f"{folder / file} is unreadable ({_first_line(exc)}); {FETCH_HINT}") from None
        if isinstance(doc, dict) and "auto_map" in doc:
            classes = ", ".join(sorted(map(str, doc["auto_map"])) if isinstance(doc["auto_map"], dict) else [])
            raise AssetError(f"checkpoint {name} ships its own Python code ({file} auto_map: {classes or '?'}); "
                             "streamkv never runs checkpoint code (trust_remote_code=False): use a checkpoint "
                             "of an architecture transformers implements")


def _checked_source(spec: ModelSpec) -> tuple[str, dict]:
    """(from_pretrained source, kwargs) of a local checkpoint or a cached hub model, after
    refuse_remote_code."""
    local = _local_dir(spec)
    if local is not None:
        refuse_remote_code(local, spec.name)
        return str(local), {"trust_remote_code": False}
    refuse_remote_code(_cached_snapshot(spec), spec.name)
    return spec.name, {"revision": spec.revision, "trust_remote_code": False}


# ------------------------------------------------------------------------------------------------ models
def demo_model_spec(dtype: str = "float32") -> ModelSpec:
    """The committed demo checkpoint; its revision is the sha256 recorded when it was trained."""
    train_config = DEMO_DIR / "train_config.json"
    if not train_config.is_file():
        raise _missing("demo model training record", train_config)
    revision = json.loads(train_config.read_text(encoding="utf-8"))["weights"]["sha256"]
    return ModelSpec(name=_relative(DEMO_DIR), revision=revision, dtype=dtype)


def _bundled_config(spec: ModelSpec) -> Path | None:
    """The config committed under streamkv/configs/ for a known hub model (e.g. pythia-2.8b.json)."""
    bundled = CONFIG_DIR / f"{spec.name.rsplit('/', 1)[-1].lower()}.json"
    return bundled if _local_dir(spec) is None and bundled.is_file() else None


def vocab_size(spec: ModelSpec) -> int:
    """The vocabulary size in the config load_config reads, from its JSON alone: planning a synthetic stream
    (and `make tex`) must not import transformers and torch."""
    local = _local_dir(spec)
    file = _bundled_config(spec) or (local / "config.json" if local is not None else None)
    if file is None:
        snapshot = _cached_snapshot(spec)
        file = snapshot / "config.json" if snapshot is not None else None
    if file is None:
        raise _missing(f"config of {spec.name}@{spec.revision}", "no local checkpoint, bundled config or hub cache")
    try:
        return int(json.loads(file.read_text(encoding="utf-8"))["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AssetError(f"{file} gives no vocab_size ({_first_line(exc)}); {FETCH_HINT}") from None


def load_config(spec: ModelSpec):
    """The model's transformers config: the local directory's config.json, the config committed under
    streamkv/configs/ for known hub models (e.g. pythia-2.8b.json), else the local hub cache."""
    from transformers import AutoConfig

    bundled = _bundled_config(spec)
    if bundled is not None:
        source, kwargs = bundled, {"trust_remote_code": False}
    else:
        source, kwargs = _checked_source(spec)
    try:
        return AutoConfig.from_pretrained(str(source), local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise AssetError(f"config of {spec.name}@{spec.revision} not available locally "
                         f"({_first_line(exc)}); {FETCH_HINT}") from None


def load_model(spec: ModelSpec, device="cpu"):
    """The model in eval mode on `device`, in spec.dtype. random_weights=True: the architecture from
    load_config with weights drawn after torch.manual_seed(0) (timing runs only; nothing is read)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, spec.dtype)
    if spec.random_weights:
        config = load_config(spec)
        torch.manual_seed(0)
        with torch.device(device):  # initialise in place: a 2.8B model never round-trips through the host
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        return model.eval()

    source, kwargs = _checked_source(spec)
    local = _local_dir(spec)
    if local is not None:
        weights = local / "model.safetensors"
        if not weights.is_file():
            raise _missing("model weights", weights)
        actual = sha256_file(weights)
        if actual != spec.revision:
            raise AssetError(f"{weights} has sha256 {actual}, but the model spec pins {spec.revision}; "
                             f"the file is corrupted or from another training run; {FETCH_HINT}")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=dtype,
                                                           output_loading_info=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise AssetError(f"model {spec.name}@{spec.revision} not available locally ({_first_line(exc)}); "
                         f"{FETCH_HINT}") from None
    # transformers fills absent weights with random values and only warns; a half-loaded model would give
    # plausible-looking wrong numbers, so any key mismatch is fatal.
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise AssetError(f"model {spec.name}@{spec.revision} does not match its architecture: {problems}")
    return model.to(device).eval()


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    source, kwargs = _checked_source(spec)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise AssetError(f"tokenizer of {spec.name}@{spec.revision} not available locally "
                         f"({_first_line(exc)}); {FETCH_HINT}") from None


# ----------------------------------------------------------------------------------------------- streams
def synthetic_path(seed: int, vocab_size: int) -> str:
    """Stream path of seeded random token ids, for random-weights timing runs (no text, no tokenizer)."""
    return f"{SYNTHETIC_PREFIX}{seed}:{vocab_size}"


def _synthetic(name: str, path: str, max_tokens: int | None) -> tuple[torch.Tensor, DataSpec]:
    import torch

    try:
        seed, vocab_size = (int(x) for x in path[len(SYNTHETIC_PREFIX):].split(":"))
    except ValueError:
        raise SpecError(f"synthetic stream path must be 'synthetic:<seed>:<vocab>', got {path!r}") from None
    if max_tokens is None or max_tokens < 2:
        raise SpecError(f"synthetic stream {name!r} needs a token count >= 2 (--max-eval-tokens)")
    ids = torch.randint(0, vocab_size, (max_tokens,), generator=torch.Generator().manual_seed(seed))
    return ids, DataSpec(name=name, path=path, sha256=ids_sha256(ids), n_tokens=max_tokens)


def ids_sha256(ids: torch.Tensor) -> str:
    """DataSpec.sha256: the sha256 of the evaluated token ids as int64 little-endian bytes."""
    return hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest()


def load_stream(name: str, path: str, tokenizer, max_tokens: int | None = None) -> tuple[torch.Tensor, DataSpec]:
    """Token ids (LongTensor [n]) of a stream file and its DataSpec.

    The file is JSON {"text", "source", "n_chars", "sha256"} (+ provenance); the text must match its
    recorded sha256. Tokenized without special tokens; truncated to max_tokens (None: the whole stream);
    asking for more tokens than the stream has is an error, never a silently shorter run.
    DataSpec.sha256 is `ids_sha256` of the ids returned (not the text's sha256): it changes with the
    tokenizer too, so a result is never reused across tokenizers that split the text differently.
    """
    import torch

    if path.startswith(SYNTHETIC_PREFIX):
        return _synthetic(name, path, max_tokens)
    file = _resolve(path)
    if not file.is_file():
        raise _missing(f"stream {name!r}", file)
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
        text, recorded = record["text"], record["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise AssetError(f"stream file {file} is not a valid stream JSON ({_first_line(exc)}); {FETCH_HINT}") from None
    actual = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if actual != recorded or record.get("n_chars", len(text)) != len(text):
        raise AssetError(f"stream file {file}: text sha256 {actual} ({len(text)} chars) does not match the "
                         f"recorded {recorded} ({record.get('n_chars')} chars); the file was modified; {FETCH_HINT}")
    # verbose=False: long streams exceed model_max_length by design; the engines handle the length.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        if len(ids) < max_tokens:
            raise SpecError(f"stream {name!r} has {len(ids)} tokens, fewer than the {max_tokens} asked for")
        ids = ids[:max_tokens]
    ids = torch.tensor(ids, dtype=torch.long)
    return ids, DataSpec(name=name, path=_relative(file), sha256=ids_sha256(ids), n_tokens=len(ids))
