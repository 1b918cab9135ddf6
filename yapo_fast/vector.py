"""SteeringVector: what was trained, for which model and SAE, and its values. Knows nothing of kernels.

On disk: one safetensors file. Tensors ``values`` (and ``indices`` for sparse YaPO vectors);
the header's metadata holds one JSON string under ``yapo_fast`` with everything else. It is
validated (types, shapes, ranges, finiteness) before any tensor is used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from yapo_fast.atomic import atomic_path
from yapo_fast.errors import MAX_WIDTH, VectorMismatchError, YapoFastError, check_finite, check_multiplier

METHODS = ("yapo", "bipo", "caa")
SPARSE_METHODS = ("yapo",)
FORMAT_VERSION = 1
MAX_FILE_BYTES = 2 << 30  # 2 GiB: larger than any vector for a d_sae of 2^28 float32 entries


@dataclass(eq=False)
class SteeringVector:
    method: str  # "yapo" (sparse, SAE latent space) | "bipo" | "caa" (dense, residual space)
    layer: int  # decoder layer whose output is steered
    values: torch.Tensor  # yapo: (nnz,) values at `indices`; dense: (d_model,)
    d_model: int
    indices: torch.Tensor | None = None  # yapo: (nnz,) sorted unique latent indices
    d_sae: int | None = None
    multiplier: float = 1.0  # default multiplier when none is given
    model: dict = field(default_factory=dict)  # identity of the model: name, d_model, n_layers, fingerprint
    sae: dict | None = None  # identity of the SAE (yapo_fast.SAE.identity()) for yapo vectors
    info: dict = field(default_factory=dict)  # free-form provenance (data, steps, seed, ...)

    def __post_init__(self):
        self.validate()

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_latent(
        cls,
        latent: torch.Tensor,
        *,
        layer: int,
        sae,
        model: dict | None = None,
        multiplier: float = 1.0,
        info: dict | None = None,
    ) -> "SteeringVector":
        """A YaPO vector from a dense (d_sae,) latent tensor; its non-zero entries are kept."""
        latent = latent.detach().to("cpu", torch.float32).reshape(-1)
        if latent.numel() != sae.d_sae:
            raise YapoFastError(f"latent vector has {latent.numel()} entries but the SAE has d_sae={sae.d_sae}")
        idx = torch.nonzero(latent).reshape(-1)
        return cls(
            method="yapo",
            layer=layer,
            values=latent[idx].clone(),
            indices=idx,
            d_model=sae.d_in,
            d_sae=sae.d_sae,
            multiplier=multiplier,
            model=dict(model or {}),
            sae=sae.identity(),
            info=dict(info or {}),
        )

    @classmethod
    def from_dense(
        cls,
        vector: torch.Tensor,
        *,
        method: str,
        layer: int,
        model: dict | None = None,
        multiplier: float = 1.0,
        info: dict | None = None,
    ) -> "SteeringVector":
        vector = vector.detach().to("cpu", torch.float32).reshape(-1).clone()
        return cls(
            method=method,
            layer=layer,
            values=vector,
            d_model=vector.numel(),
            multiplier=multiplier,
            model=dict(model or {}),
            info=dict(info or {}),
        )

    # ---- views -----------------------------------------------------------------------------
    @property
    def is_sparse(self) -> bool:
        return self.method in SPARSE_METHODS

    def latent(self) -> torch.Tensor:
        """Dense (d_sae,) float32 latent vector of a YaPO vector."""
        if not self.is_sparse:
            raise YapoFastError(f"a {self.method} vector is dense in the residual stream; it has no SAE latent form")
        out = torch.zeros(self.d_sae, dtype=torch.float32)
        out[self.indices] = self.values.to(torch.float32)
        return out

    def dense(self) -> torch.Tensor:
        if self.is_sparse:
            raise YapoFastError("a yapo vector lives in SAE latent space; use latent() or steer through its SAE")
        return self.values.to(torch.float32)

    # ---- checks ----------------------------------------------------------------------------
    def validate(self) -> None:
        if self.method not in METHODS:
            raise YapoFastError(f"unknown steering method {self.method!r}; use one of {METHODS}")
        if not isinstance(self.layer, int) or self.layer < 0:
            raise YapoFastError(f"vector layer must be a non-negative int, got {self.layer!r}")
        if not isinstance(self.d_model, int) or not 0 < self.d_model <= MAX_WIDTH:
            raise YapoFastError(f"d_model must be a positive int (at most {MAX_WIDTH}), got {self.d_model!r}")
        check_multiplier(self.multiplier, "default multiplier")
        if not isinstance(self.values, torch.Tensor) or self.values.dim() != 1 or not self.values.is_floating_point():
            raise YapoFastError("vector values must be a 1-D floating-point tensor")
        check_finite(
            f"{self.method} steering vector", self.values, "Retrain it (lower the learning rate) or fix the file."
        )
        if self.is_sparse:
            if not isinstance(self.d_sae, int) or not 0 < self.d_sae <= MAX_WIDTH:
                raise YapoFastError(
                    f"a yapo vector needs d_sae (a positive int, at most {MAX_WIDTH}), got {self.d_sae!r}"
                )
            idx = self.indices
            if idx is None or idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
                raise YapoFastError("a yapo vector needs 1-D integer `indices` beside its values")
            if idx.numel() != self.values.numel():
                raise YapoFastError(f"yapo vector has {idx.numel()} indices but {self.values.numel()} values")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.d_sae):
                raise YapoFastError(f"yapo vector indices must lie in [0, d_sae={self.d_sae})")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise YapoFastError("yapo vector indices must be sorted and unique")
        elif self.values.numel() != self.d_model:
            raise YapoFastError(f"{self.method} vector has {self.values.numel()} values but d_model={self.d_model}")

    def check_compatible(self, *, model: dict | None = None, sae=None, n_layers: int | None = None) -> None:
        """Refuse, with the reason, a vector applied to another model or SAE than it was trained for."""
        if model:
            n_layers = model.get("n_layers", n_layers)
            if model.get("d_model") not in (None, self.d_model):
                raise VectorMismatchError(
                    f"vector was trained for hidden size d_model={self.d_model} but the model "
                    f"{model.get('name')!r} has {model['d_model']}: use a vector trained for this model"
                )
            for key in ("fingerprint", "name"):
                mine, theirs = self.model.get(key), model.get(key)
                if key == "fingerprint" and mine and theirs and mine != theirs:
                    raise VectorMismatchError(
                        f"vector was trained for model {self.model.get('name')!r} (weights {mine}) but is "
                        f"applied to {model.get('name')!r} (weights {theirs}): use a vector trained for this model"
                    )
        if n_layers is not None and self.layer >= n_layers:
            raise YapoFastError(
                f"vector steers layer {self.layer} but the model has {n_layers} decoder layers "
                f"(0..{n_layers - 1}): use a vector trained for this model"
            )
        if self.is_sparse:
            if sae is None:
                raise YapoFastError("a yapo vector needs the SAE it was trained with: pass sae=...")
            if sae.d_in != self.d_model:
                raise VectorMismatchError(
                    f"SAE {sae.name!r} reads d_in={sae.d_in} but the vector steers "
                    f"d_model={self.d_model}: load the SAE the vector was trained with"
                )
            if sae.d_sae != self.d_sae:
                raise VectorMismatchError(
                    f"vector was trained for an SAE of width d_sae={self.d_sae} but SAE "
                    f"{sae.name!r} has d_sae={sae.d_sae}: load the SAE the vector was trained with"
                )
            want = (self.sae or {}).get("hash")
            if want and want != sae.weights_hash():
                raise VectorMismatchError(
                    f"vector was trained for SAE {self.sae.get('name')!r} (weights {want}) but SAE {sae.name!r} "
                    f"has weights {sae.weights_hash()}: load the SAE the vector was trained with"
                )
            if sae.layer is not None and sae.layer != self.layer:
                raise VectorMismatchError(
                    f"vector steers layer {self.layer} but SAE {sae.name!r} reads layer "
                    f"{sae.layer}: load the SAE the vector was trained with"
                )

    # ---- files -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"values": self.values.detach().to("cpu", torch.float32).contiguous()}
        if self.is_sparse:
            tensors["indices"] = self.indices.detach().to("cpu", torch.int64).contiguous()
        header = {k: v for k, v in asdict_shallow(self).items() if k not in ("values", "indices")}
        header["format_version"] = FORMAT_VERSION
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"yapo_fast": json.dumps(header)})
        return path


def asdict_shallow(vec: SteeringVector) -> dict:
    return {f: getattr(vec, f) for f in vec.__dataclass_fields__}


def load_vector(path: str | os.PathLike, *, model: dict | None = None, sae=None) -> SteeringVector:
    """Read and validate a vector file; with model/sae given, also check it was trained for them."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise YapoFastError(f"no steering vector file at {path}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise YapoFastError(f"{path} is {size} bytes, far more than any steering vector: refusing to read it")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if "yapo_fast" not in meta:
                raise YapoFastError(
                    f"{path} is a safetensors file but not a yapo-fast steering vector "
                    "(no 'yapo_fast' metadata): save vectors with SteeringVector.save"
                )
            header = json.loads(meta["yapo_fast"])
            tensors = {name: f.get_tensor(name) for name in names & {"values", "indices"}}
    except YapoFastError:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
        raise YapoFastError(
            f"{path} is not a readable steering vector (corrupt or truncated file: "
            f"{type(exc).__name__}: {exc}); re-save or re-download it"
        ) from exc
    if not isinstance(header, dict) or "values" not in tensors:
        raise YapoFastError(f"{path}: steering vector file lacks its 'values' tensor or header")
    known = set(SteeringVector.__dataclass_fields__) - {"values", "indices"}
    header.pop("format_version", None)
    unknown = set(header) - known
    if unknown:
        raise YapoFastError(
            f"{path}: unknown fields {sorted(unknown)} in the vector header (written by a newer yapo-fast?)"
        )
    try:
        vec = SteeringVector(values=tensors["values"], indices=tensors.get("indices"), **header)
    except TypeError as exc:
        raise YapoFastError(f"{path}: malformed vector header ({exc})") from exc
    except YapoFastError as exc:
        raise YapoFastError(f"{path}: {exc}") from exc
    if model is not None or sae is not None:
        vec.check_compatible(model=model, sae=sae)
    return vec
