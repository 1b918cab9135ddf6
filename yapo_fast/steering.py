"""The steering op as every host calls it: prepared once per (vector, SAE, multiplier), then a
plain function h -> h'. Hosts (transformers hooks, the trainer, the vLLM plugin) only locate
layer L's output and call it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from yapo_fast.errors import YapoFastError, check_finite, check_multiplier  # noqa: F401 (check_multiplier: re-exported)
from yapo_fast.kernels.dense_steer import dense_steer as dense_kernel
from yapo_fast.kernels.sparse_steer import prepare_sparse_steer
from yapo_fast.kernels.sparse_steer import sparse_steer as fused_sparse_steer
from yapo_fast.vector import SteeringVector


def _check_hidden(h: torch.Tensor, d_model: int, what: str) -> None:
    if h.shape[-1] != d_model:
        raise YapoFastError(
            f"hidden states have size {h.shape[-1]} but the {what} expects d_model={d_model}: "
            "use a vector and SAE trained for this model"
        )


def sparse_steer(
    h: torch.Tensor, sae, vector: "SteeringVector | torch.Tensor", multiplier: float = 1.0
) -> torch.Tensor:
    """YaPO at every position of h (..., d_model): h + Dec(ReLU(Enc(h) + m*v)) - Dec(Enc(h)).

    Exact, through the fused kernels (yapo_fast.kernels.sparse_steer); differentiable wrt h and
    the latent. To steer many calls with one vector, prepare once: make_steer_fn."""
    multiplier = check_multiplier(multiplier)
    latent = vector.latent() if isinstance(vector, SteeringVector) else vector
    if latent.shape != (sae.d_sae,):
        raise YapoFastError(f"latent vector has shape {tuple(latent.shape)} but the SAE has d_sae={sae.d_sae}")
    _check_hidden(h, sae.d_in, f"SAE {sae.name!r}")
    check_finite("latent vector", latent)
    sae = sae.to(device=h.device) if sae.device != h.device else sae
    return fused_sparse_steer(h, prepare_sparse_steer(sae, latent.to(h.device), multiplier))


def dense_steer(h: torch.Tensor, vector: "SteeringVector | torch.Tensor", multiplier: float = 1.0) -> torch.Tensor:
    """BiPO / CAA at every position: h + m*v."""
    multiplier = check_multiplier(multiplier)
    v = vector.dense() if isinstance(vector, SteeringVector) else vector
    _check_hidden(h, v.shape[-1], "steering vector")
    check_finite("steering vector", v)
    return dense_kernel(h, v, multiplier)


@dataclass(frozen=True)
class Steering:
    """One steering, as every host takes it: a vector, the SAE it lives in (yapo vectors; dense ones
    carry none) and the multiplier. Built by Steering.of, which checks everything once: the
    multiplier (the vector's own when None), that a yapo vector has its SAE and that their sizes
    agree. Hosts: yapo_fast.steer / patch_model (transformers), yapo_fast.patch / register_vector
    (vLLM), the evaluation, and the trainer (Steering.trainable: the vector is the tensor being
    trained, steered from cached SAE codes by steer_cached)."""

    vector: "SteeringVector | torch.Tensor"
    multiplier: float
    sae: object | None = None

    @classmethod
    def of(cls, vector, multiplier: float | None = None, *, sae=None) -> "Steering":
        if isinstance(vector, Steering):
            if multiplier is None and sae is None:
                return vector
            return cls.of(
                vector.vector,
                vector.multiplier if multiplier is None else multiplier,
                sae=vector.sae if sae is None else sae,
            )
        if not isinstance(vector, SteeringVector):
            raise YapoFastError(
                f"expected a SteeringVector (yapo_fast.load_vector(path)) or a Steering, got {type(vector).__name__}"
            )
        m = check_multiplier(vector.multiplier if multiplier is None else multiplier)
        if not vector.is_sparse:
            return cls(vector, m, None)  # dense steering reads no SAE
        if sae is None:
            raise YapoFastError("a yapo vector needs the SAE it was trained with: pass sae=yapo_fast.load_sae(...)")
        if vector.d_sae != sae.d_sae:
            raise YapoFastError(f"vector has d_sae={vector.d_sae} but the SAE has d_sae={sae.d_sae}")
        return cls(vector, m, sae)

    @classmethod
    def trainable(cls, v: torch.Tensor, multiplier: float, *, sae=None) -> "Steering":
        """The trainer's steering: `v` is the raw tensor being trained (an SAE latent when `sae` is
        given, yapo; a d_model vector otherwise, bipo), `multiplier` the batch direction d. Shapes
        are the trainer's own (checked when its run starts), so nothing is validated per step."""
        return cls(v, float(multiplier), sae)

    @property
    def layer(self) -> int:
        return self.vector.layer

    def steer_cached(self, h: torch.Tensor, codes: dict | None = None) -> torch.Tensor:
        """h (rows, d_model) steered, for a trainable steering: yapo from `codes`, the sparse SAE
        codes Enc(h) of those rows (rows, cols, vals) computed once when h was cached, so the step
        needs no encoder (train/objective.yapo_delta, the same exact formula as the op); bipo
        h + m v. Differentiable in v."""
        from yapo_fast.train.objective import yapo_delta  # the trainer imports this module: import late

        if self.sae is None:
            return h + self.multiplier * self.vector
        return h + yapo_delta(codes, h.shape[0], self.vector, self.multiplier, self.sae.W_dec)

    def steer_fn(self):
        """h -> h', the vector prepared once per device (the op's dispatch point: kernels/)."""
        if self.vector.is_sparse:
            return _sparse_fn(self.sae, self.vector.latent(), self.multiplier)
        dense, m = self.vector.dense(), self.multiplier
        return lambda h: dense_kernel(h, dense, m)


def _sparse_fn(sae, latent: torch.Tensor, multiplier: float):
    cache = {}  # device -> PreparedSteer

    def steer_fn(h: torch.Tensor) -> torch.Tensor:
        if h.device not in cache:
            _check_hidden(h, sae.d_in, f"SAE {sae.name!r}")
            cache[h.device] = prepare_sparse_steer(
                sae.to(device=h.device, dtype=torch.float32), latent.to(h.device), multiplier
            )
        return fused_sparse_steer(h, cache[h.device])

    return steer_fn


@dataclass
class SteeringHandle:
    """What a host returns for an active steering: .remove() undoes it (idempotent); also a
    context manager. The same class for transformers hooks and vLLM engines."""

    steering: Steering
    _remove: Callable[[], None] | None = field(repr=False, default=None)

    @property
    def vector(self) -> SteeringVector:
        return self.steering.vector

    @property
    def multiplier(self) -> float:
        return self.steering.multiplier

    @property
    def layer(self) -> int:
        return self.steering.layer

    @property
    def active(self) -> bool:
        return self._remove is not None

    def remove(self) -> None:
        if self._remove is not None:
            remove, self._remove = self._remove, None
            remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def make_steer_fn(vector: SteeringVector, multiplier: float, sae=None):
    """Prepare once; return h -> h' for one (vector, SAE, multiplier)."""
    return Steering.of(vector, multiplier, sae=sae).steer_fn()
