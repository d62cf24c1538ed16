"""The model store: argument checking, and (slow) the real default checkpoint end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from alignlens.service import modelstore


def test_resolve_model_rejects_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="config.json") as info:
        modelstore.resolve_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_resolve_model_accepts_local_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert modelstore.resolve_model(str(tmp_path)) == tmp_path.resolve()


def test_alignlens_home_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGNLENS_HOME", str(tmp_path))
    assert modelstore.alignlens_home() == tmp_path


@pytest.mark.slow
def test_default_model_fetch_load_generate(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real default home on purpose: converting twice into a tmp home is too slow, and
    # fetching must be idempotent there anyway.
    monkeypatch.delenv("ALIGNLENS_HOME", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = modelstore.fetch_default_model(progress=False)
    start = time.monotonic()
    assert modelstore.resolve_model("default") == path
    assert time.monotonic() - start < 2.0

    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="gemma3-270m") as info:
        modelstore.fetch_model("gemma9-1t")
    assert "'default'" in str(info.value)


@pytest.mark.slow
def test_gemma3_270m_fetch_shows_terms_and_generates(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("ALIGNLENS_HOME", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = modelstore.fetch_model("gemma3-270m", progress=False)
    assert "Gemma Terms of Use" in capsys.readouterr().err  # shown every time it is fetched
    assert modelstore.resolve_model("gemma3-270m") == path
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (18, 640, 262144)
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer("Water boils at a temperature of", return_tensors="pt")
    assert inputs["input_ids"][0, 0].item() == tokenizer.bos_token_id  # Gemma degenerates without BOS
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "100 degrees" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
