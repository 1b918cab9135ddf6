"""The steering op as every host calls it: prepared once per (vector, SAE, multiplier), then a
plain function h -> h'. Hosts (transformers hooks, the trainer, the vLLM plugin) only locate
layer L's output and call it."""

from __future__ import annotations

import torch

from .errors import YapoFastError, check_finite, check_multiplier  # noqa: F401 (check_multiplier: re-exported)
from .kernels.sparse_steer import prepare_sparse_steer
from .kernels.sparse_steer import sparse_steer as fused_sparse_steer
from .kernels.sparse_steer_reference import dense_steer_reference
from .vector import SteeringVector


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
    return dense_steer_reference(h, v.to(h.device), multiplier)


def make_steer_fn(vector: SteeringVector, multiplier: float, sae=None):
    """Prepare once; return h -> h' for one (vector, SAE, multiplier)."""
    multiplier = check_multiplier(multiplier)
    if vector.is_sparse:
        if sae is None:
            raise YapoFastError("a yapo vector is steered through its SAE: pass sae=...")
        latent = vector.latent()
        if latent.shape != (sae.d_sae,):
            raise YapoFastError(f"vector has d_sae={latent.shape[0]} but the SAE has d_sae={sae.d_sae}")
        cache = {}  # device -> PreparedSteer: the vector is prepared once per device

        def steer_fn(h: torch.Tensor) -> torch.Tensor:
            key = h.device
            if key not in cache:
                _check_hidden(h, sae.d_in, f"SAE {sae.name!r}")
                cache[key] = prepare_sparse_steer(
                    sae.to(device=h.device, dtype=torch.float32), latent.to(h.device), multiplier
                )
            return fused_sparse_steer(h, cache[key])

        return steer_fn
    dense = vector.dense()

    def dense_fn(h: torch.Tensor) -> torch.Tensor:
        return dense_steer_reference(h, dense.to(h.device), multiplier)

    return dense_fn
