"""The embedded default model: GGUF from PyPI, converted once, answers sensibly."""

import os

import pytest

from yapo_fast import load_model, model_identity
from yapo_fast.eval.generate import generate_text
from yapo_fast.model import DEFAULT_MODEL, default_model_dir


@pytest.mark.slow
def test_default_model_converts_once_and_answers():
    path = default_model_dir()
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert "quantization_config" not in (path / "config.json").read_text()
    stamp = os.stat(path / "model.safetensors").st_mtime_ns
    model, tok = load_model(None)
    assert default_model_dir() == path and os.stat(path / "model.safetensors").st_mtime_ns == stamp  # no reconversion
    ident = model_identity(model)
    assert ident["name"] == DEFAULT_MODEL and ident["d_model"] == 576 and ident["n_layers"] == 30
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    answer = generate_text(model, tok, ["What is the capital of France?"], max_new_tokens=12)[0]
    assert "Paris" in answer


def test_conversion_is_atomic(tmp_path, monkeypatch):
    """A conversion killed half-way leaves only a hidden temporary, never a loadable half model."""
    import yapo_fast.model as m

    monkeypatch.setenv("YAPO_FAST_CACHE", str(tmp_path))

    class Killed(Exception):
        pass

    def die(*a, **k):
        raise Killed

    monkeypatch.setattr("transformers.PreTrainedTokenizerBase.save_pretrained", die)
    with pytest.raises(Killed):
        m.default_model_dir()
    models = tmp_path / "models"
    assert not (models / DEFAULT_MODEL).exists()
    assert [p.name for p in models.iterdir() if not p.name.startswith(".")] == []
