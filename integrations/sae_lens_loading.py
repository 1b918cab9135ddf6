"""sae-lens <-> yapo_fast.SAE. sae-lens owns the file format and the pretrained registry;
we only copy its tensors into our compact type (and back, to save in its format)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from yapo_fast.errors import YapoFastError
from yapo_fast.sae.autoencoder import SAE, layer_from_hook_name

# sae-lens architecture name -> our kind
_KIND_OF_ARCHITECTURE = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}


def from_sae_lens(sae_lens_sae, *, name: str | None = None, device=None, dtype=None) -> SAE:
    """Copy a loaded sae-lens SAE (inference class) into a yapo_fast SAE."""
    cfg = sae_lens_sae.cfg
    arch = cfg.architecture()
    if arch not in _KIND_OF_ARCHITECTURE:
        raise YapoFastError(
            f"sae-lens architecture {arch!r} is not supported; yapo-fast steers {sorted(_KIND_OF_ARCHITECTURE)} SAEs"
        )
    if getattr(cfg, "normalize_activations", "none") not in ("none", None):
        raise YapoFastError(
            f"this SAE normalizes its input ({cfg.normalize_activations!r}); fold the scaling into "
            "the weights first (sae-lens: sae.fold_activation_norm_scaling_factor(...))"
        )
    if getattr(cfg, "rescale_acts_by_decoder_norm", False):
        raise YapoFastError(
            "TopK SAEs with rescale_acts_by_decoder_norm=True are not supported; "
            "call sae.fold_W_dec_norm() in sae-lens first"
        )
    meta = cfg.metadata.to_dict() if hasattr(cfg.metadata, "to_dict") else dict(cfg.metadata or {})
    hook_name = meta.get("hook_name")

    def grab(attr):
        t = getattr(sae_lens_sae, attr, None)
        return None if t is None else t.detach().to(device=device, dtype=dtype).clone()

    kind = _KIND_OF_ARCHITECTURE[arch]
    return SAE(
        kind=kind,
        W_enc=grab("W_enc"),
        b_enc=grab("b_enc"),
        W_dec=grab("W_dec"),
        b_dec=grab("b_dec"),
        threshold=grab("threshold") if kind == "jumprelu" else None,
        k=int(cfg.k) if kind == "topk" else None,
        apply_b_dec_to_input=bool(cfg.apply_b_dec_to_input),
        layer=layer_from_hook_name(hook_name) if meta.get("hook_layer") is None else meta.get("hook_layer"),
        model_name=meta.get("model_name"),
        name=name or meta.get("sae_lens_id") or meta.get("release") or "sae",
        metadata={k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))},
    )


def to_sae_lens(sae: SAE):
    """Build the sae-lens inference SAE holding the same tensors (to save it in sae-lens's format)."""
    from sae_lens import SAE as SaeLensSAE

    arch = {v: k for k, v in _KIND_OF_ARCHITECTURE.items()}[sae.kind]
    cfg = {
        "architecture": arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "device": str(sae.device),
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "metadata": {
            **sae.metadata,
            "model_name": sae.model_name,
            "hook_name": f"blocks.{sae.layer}.hook_resid_post" if sae.layer is not None else None,
        },
    }
    if sae.kind == "topk":
        cfg["k"] = sae.k
    cls = SaeLensSAE.get_sae_class_for_architecture(arch)
    cfg_cls = SaeLensSAE.get_sae_config_class_for_architecture(arch)
    out = cls(cfg_cls.from_dict(cfg))
    state = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.kind == "jumprelu":
        state["threshold"] = sae.threshold
    out.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return out


def save_sae(sae: SAE, path: str | Path) -> Path:
    """Write `sae` in sae-lens's on-disk format, atomically."""
    from yapo_fast.atomic import atomic_dir

    path = Path(path)
    with atomic_dir(path) as tmp:
        to_sae_lens(sae).save_model(tmp)
    return path


def _check_files_agree(cfg_path: Path, weights_path: Path) -> None:
    """cfg.json's widths are sane and the safetensors header holds exactly the tensors they imply.

    Only the JSON and the safetensors header are read (safetensors itself checks that the header's
    offsets fit the file): a cfg.json claiming an absurd width, or weights of other shapes, are
    refused before sae-lens builds an SAE (and allocates its tensors) from cfg.json."""
    from safetensors import safe_open

    from yapo_fast.errors import MAX_WIDTH

    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise YapoFastError(f"{cfg_path} is not valid JSON ({exc}); re-save or re-download the SAE") from None
    if not isinstance(cfg, dict):
        raise YapoFastError(f"{cfg_path} must hold a JSON object (the sae-lens config)")
    dims = {}
    for key in ("d_in", "d_sae"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_WIDTH:
            raise YapoFastError(f"{cfg_path}: {key} must be a positive integer (at most {MAX_WIDTH}), got {value!r}")
        dims[key] = value
    d_in, d_sae = dims["d_in"], dims["d_sae"]
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if cfg.get("architecture") == "jumprelu":
        expected["threshold"] = (d_sae,)
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as exc:  # safetensors' own errors for a truncated or corrupt header
        raise YapoFastError(
            f"{weights_path} is not a readable safetensors file (corrupt or truncated: "
            f"{type(exc).__name__}: {exc}); re-save or re-download the SAE"
        ) from None
    for name, shape in expected.items():
        if shapes.get(name) != shape:
            raise YapoFastError(
                f"{weights_path}: tensor {name} has shape {shapes.get(name)} but {cfg_path.name} "
                f"(d_in={d_in}, d_sae={d_sae}) implies {shape}: the SAE's files disagree "
                "(corrupt, or from another SAE); re-save or re-download it"
            )


def load_from_disk(path: str | Path, *, device="cpu", dtype=torch.float32) -> SAE:
    from sae_lens import SAE as SaeLensSAE

    path = Path(path)
    cfg_path, weights_path = path / "cfg.json", path / "sae_weights.safetensors"
    if not cfg_path.exists() or not weights_path.exists():
        raise YapoFastError(
            f"{path} is not an SAE directory in sae-lens format: it needs cfg.json and sae_weights.safetensors"
        )
    _check_files_agree(cfg_path, weights_path)  # before sae-lens allocates anything from cfg.json
    try:
        loaded = SaeLensSAE.load_from_disk(str(path), device=str(device))
    except Exception as exc:  # sae-lens raises many types for a bad file; name the file instead
        raise YapoFastError(
            f"could not read the SAE in {path} ({type(exc).__name__}: {exc}); the files "
            "are corrupt or not written by sae-lens: re-save or re-download them"
        ) from exc
    return from_sae_lens(loaded, name=path.name, device=device, dtype=dtype)


def load_pretrained(release: str, sae_id: str, *, device="cpu", dtype=torch.float32) -> SAE:
    """A sae-lens pretrained release (e.g. 'gemma-scope-2b-pt-res-canonical', 'layer_20/width_16k/canonical')."""
    from sae_lens import SAE as SaeLensSAE

    try:
        loaded = SaeLensSAE.from_pretrained(release, sae_id, device=str(device))
    except Exception as exc:
        raise YapoFastError(
            f"could not load sae-lens release {release!r} id {sae_id!r} ({type(exc).__name__}: "
            f"{exc}); check the names in sae-lens's pretrained_saes.yaml and that this machine "
            "reaches the Hugging Face Hub"
        ) from exc
    return from_sae_lens(loaded, name=f"{release}/{sae_id}", device=device, dtype=dtype)
