"""Named steering vectors for vLLM: start-up loading (``YAPO_FAST_VECTORS``, read by each worker
once its model is loaded) and file payloads for RPC (built in the front end, opened in workers).

``YAPO_FAST_VECTORS="name=path/v.safetensors[@sae_dir][*multiplier],name2=..."``: a yapo vector
without ``@sae_dir`` uses the SAE shipped for the default model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from yapo_fast.errors import YapoFastError, check_multiplier
from yapo_fast.integrations.vllm_requests import GLOBAL_NAME

ENV = "YAPO_FAST_VECTORS"


def parse_spec(raw: str | None) -> dict[str, tuple[str, str | None, float | None]]:
    """name -> (vector path, SAE dir or None, multiplier or None)."""
    out: dict = {}
    for item in (raw or "").split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise YapoFastError(f"{ENV} entry {item!r} must look like name=vector.safetensors[@sae_dir][*multiplier]")
        name, rest = (x.strip() for x in item.split("=", 1))
        if not name or name.lower() == "none" or name == GLOBAL_NAME:
            raise YapoFastError(f"{ENV}: {name!r} cannot name a vector")
        m = None
        if "*" in rest:
            rest, ms = rest.rsplit("*", 1)
            try:
                m = float(ms)
            except ValueError:
                raise YapoFastError(f"{ENV}: multiplier {ms!r} of vector {name!r} is not a number") from None
            m = check_multiplier(m, f"{ENV}: multiplier of vector {name!r}")
        path, sae = (rest.split("@", 1) + [None])[:2] if "@" in rest else (rest, None)
        if name in out:
            raise YapoFastError(f"{ENV}: vector name {name!r} is given twice")
        out[name] = (path, sae, m)
    return out


def startup_names() -> set[str]:
    return set(parse_spec(os.environ.get(ENV)))


def load_one(path: str, sae_dir: str | None):
    from yapo_fast.sae.autoencoder import load_sae
    from yapo_fast.vector import load_vector

    vector = load_vector(path)
    sae = load_sae(sae_dir) if vector.is_sparse else None
    if sae is not None:
        vector.check_compatible(sae=sae)
    return vector, sae


def load_startup_vectors() -> dict:
    """name -> (SteeringVector, SAE or None, multiplier or None), from YAPO_FAST_VECTORS."""
    out = {}
    for name, (path, sae_dir, m) in parse_spec(os.environ.get(ENV)).items():
        try:
            vector, sae = load_one(path, sae_dir)
        except YapoFastError as exc:
            raise YapoFastError(f"{ENV}: vector {name!r}: {exc}") from exc
        out[name] = (vector, sae, m)
    return out


# ---- payloads: a vector (and its SAE) as file bytes, so any worker can rebuild them --------------
# An SAE is sent once per engine: later vectors for the same SAE name it by its weights hash.
_worker_saes: dict[str, object] = {}  # worker side: weights hash -> SAE


def _files(write) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="yapo-vllm-") as tmp:
        tmp = Path(tmp)
        write(tmp)
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                files[str(p.relative_to(tmp))] = p.read_bytes()
    return files


def to_payload(vector, sae=None, *, send_sae: bool = True) -> dict:
    from yapo_fast.integrations.sae_lens_loading import save_sae

    payload = {"vector": _files(lambda d: vector.save(d / "vector.safetensors"))}
    if sae is not None:
        payload["sae_hash"] = sae.weights_hash()
        if send_sae:
            payload["sae"] = _files(lambda d: save_sae(sae, d / "sae"))
    return payload


def _unpack(files: dict, tmp: Path) -> None:
    for rel, data in files.items():
        target = (tmp / rel).resolve()
        if tmp.resolve() not in target.parents:
            raise YapoFastError(f"bad file name {rel!r} in a vector payload")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def from_payload(payload: dict):
    from yapo_fast.sae.autoencoder import load_sae
    from yapo_fast.vector import load_vector

    with tempfile.TemporaryDirectory(prefix="yapo-vllm-") as tmp:
        tmp = Path(tmp)
        _unpack(payload["vector"], tmp)
        vector = load_vector(tmp / "vector.safetensors")
        sae = None
        if payload.get("sae_hash"):
            sae = _worker_saes.get(payload["sae_hash"])
            if sae is None:
                if "sae" not in payload:
                    return vector, None  # the caller asks the front end to send the SAE
                _unpack(payload["sae"], tmp)
                sae = _worker_saes[payload["sae_hash"]] = load_sae(tmp / "sae")
    if vector.is_sparse:
        if sae is None:
            raise YapoFastError("a yapo vector arrived without its SAE")
        vector.check_compatible(sae=sae)
    return vector, sae
