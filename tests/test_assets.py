"""streamkv.assets: local-only loading, integrity checks, one-line errors naming `streamkv fetch`."""
import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamkv import assets
from streamkv.assets import AssetError, load_config, load_model, load_stream, load_tokenizer, synthetic_path
from streamkv.spec import ModelSpec, SpecError

PYTHIA = ModelSpec(name="EleutherAI/pythia-2.8b", revision="0" * 40, dtype="float16", random_weights=True)
SHORT = assets.DEMO_STREAMS["demo-short"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(assets.demo_model_spec())


def _one_line_fetch_error(excinfo):
    message = str(excinfo.value)
    assert "streamkv fetch" in message and "\n" not in message
    # No chained traceback from the hub client or the OS.
    assert excinfo.value.__cause__ is None
    assert excinfo.value.__context__ is None or excinfo.value.__suppress_context__


def test_stream_truncates_and_records_its_data_spec(tokenizer):
    ids, data = load_stream("demo-short", SHORT, tokenizer, 100)
    record = json.loads((assets.REPO / SHORT).read_text())
    assert ids.dtype == torch.long and ids.shape == (100,)
    assert (data.name, data.path, data.n_tokens) == ("demo-short", SHORT, 100)
    # The hash of the ids evaluated (int64 little-endian), not of the text: it covers the tokenizer too.
    assert data.sha256 == hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest() != record["sha256"]
    full, full_data = load_stream("demo-short", SHORT, tokenizer, None)
    assert torch.equal(full[:100], ids) and full_data.n_tokens == len(full) > 1000
    assert tokenizer.decode(full) == record["text"]  # byte-level BPE round-trips, no special tokens added


def test_stream_hash_changes_with_the_tokenizer_and_the_truncation(tokenizer):
    def split_differently(text, **kwargs):
        return {"input_ids": [i + 1 for i in tokenizer(text, **kwargs)["input_ids"]]}

    ids, data = load_stream("demo-short", SHORT, tokenizer, 100)
    other_ids, other = load_stream("demo-short", SHORT, split_differently, 100)
    assert not torch.equal(ids, other_ids) and other.sha256 != data.sha256   # same text, other ids
    assert load_stream("demo-short", SHORT, tokenizer, 101)[1].sha256 != data.sha256


def test_stream_shorter_than_asked_is_an_error(tokenizer):
    with pytest.raises(SpecError, match="fewer than the 10000000 asked"):
        load_stream("demo-short", SHORT, tokenizer, 10_000_000)


def test_missing_stream_names_fetch(tmp_path, tokenizer):
    with pytest.raises(AssetError) as excinfo:
        load_stream("pg19", str(tmp_path / "long_context_50000.json"), tokenizer, 10)
    _one_line_fetch_error(excinfo)


def test_modified_stream_text_is_rejected(tmp_path, tokenizer):
    record = json.loads((assets.REPO / SHORT).read_text())
    record["text"] = record["text"].replace("the", "teh", 1)  # same length, different bytes
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(record))
    with pytest.raises(AssetError, match="does not match the recorded"):
        load_stream("demo-short", str(path), tokenizer, 10)


def test_synthetic_stream_is_seeded_and_in_vocab():
    ids, data = load_stream("synthetic", synthetic_path(3, 512), None, 1000)
    again, _ = load_stream("synthetic", synthetic_path(3, 512), None, 1000)
    other, other_data = load_stream("synthetic", synthetic_path(4, 512), None, 1000)
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    assert ids.dtype == torch.long and 0 <= ids.min() and ids.max() < 512
    assert (data.path, data.n_tokens) == ("synthetic:3:512", 1000) and data.sha256 != other_data.sha256
    with pytest.raises(SpecError):
        load_stream("synthetic", synthetic_path(3, 512), None, None)


def test_missing_weights_and_wrong_revision(tmp_path):
    with pytest.raises(AssetError) as excinfo:
        load_model(ModelSpec(name=str(tmp_path), revision="0" * 64, dtype="float32"))
    _one_line_fetch_error(excinfo)
    wrong = ModelSpec(name="data/demo", revision="f" * 64, dtype="float32")
    with pytest.raises(AssetError, match="sha256"):
        load_model(wrong)


def test_uncached_hub_model_is_one_line_asset_error():
    spec = ModelSpec(name="EleutherAI/pythia-2.8b", revision="0" * 40)  # no cache holds this revision
    for load in (load_model, load_tokenizer):
        with pytest.raises(AssetError) as excinfo:
            load(spec)
        _one_line_fetch_error(excinfo)


def test_checkpoint_missing_a_tensor_is_rejected(tmp_path):
    """transformers would fill a missing output head with random values and only warn."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets.DEMO_DIR / name, tmp_path / name)
    state = load_file(assets.DEMO_DIR / "model.safetensors")
    del state["embed_out.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    spec = ModelSpec(name=str(tmp_path), revision=assets.sha256_file(tmp_path / "model.safetensors"), dtype="float32")
    with pytest.raises(AssetError, match="does not match its architecture"):
        load_model(spec)


def test_hub_style_checkpoint_with_legacy_buffers_loads(tmp_path):
    """Pythia's hub weights still carry buffers old transformers saved (causal mask, per-layer inv_freq);
    transformers drops them knowingly, so the strict key check must not reject them."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets.DEMO_DIR / name, tmp_path / name)
    state = load_file(assets.DEMO_DIR / "model.safetensors")
    state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    spec = ModelSpec(name=str(tmp_path), revision=assets.sha256_file(tmp_path / "model.safetensors"), dtype="float32")
    ids = torch.arange(16)[None]
    reference = load_model(assets.demo_model_spec())(input_ids=ids).logits
    assert torch.equal(load_model(spec)(input_ids=ids).logits, reference)


def test_committed_pythia_config_parses():
    config = load_config(PYTHIA)
    assert config.model_type == "gpt_neox"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size,
            config.vocab_size, config.max_position_embeddings) == (32, 2560, 32, 10240, 50304, 2048)
    assert config.use_parallel_residual and not config.tie_word_embeddings and config.layer_norm_eps == 1e-5
    rope = getattr(config, "rope_parameters", None)  # transformers 5.x; 4.x keeps the hub's names
    if rope:
        assert (rope["partial_rotary_factor"], rope["rope_theta"]) == (0.25, 10000)
    else:
        assert (config.rotary_pct, config.rotary_emb_base) == (0.25, 10000)


def test_random_weights_build_a_shrunken_pythia(tmp_path):
    config = json.loads((assets.CONFIG_DIR / "pythia-2.8b.json").read_text())
    config.update(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256, vocab_size=512)
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = ModelSpec(name=str(tmp_path), revision="0" * 64, dtype="float16", random_weights=True)
    model = load_model(spec, "cpu")
    again = load_model(spec, "cpu")
    assert not model.training and {p.dtype for p in model.parameters()} == {torch.float16}
    assert len(model.gpt_neox.layers) == 2 and model.config.vocab_size == 512
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), f"{name} is not seeded"
    logits = model(input_ids=torch.arange(8)[None]).logits
    assert logits.shape == (1, 8, 512)
