"""Steering a ``vllm.LLM`` from the front end: the public API of the vLLM integration.

    handle = yapo_fast.patch(llm, vector, multiplier=1.0, sae=sae)   # every request steered
    llm.generate(...)
    handle.remove()                                                  # or yapo_fast.unpatch(llm)

    yapo_fast.register_vector(llm, "honest", vector, sae=sae)        # per-request vectors
    SamplingParams(extra_args=yapo_fast.steer_args("honest", 2.0))

The op itself is installed by the plugin (integrations/vllm_plugin.py) before vLLM compiles the
model; these calls only move vectors into every worker (``collective_rpc``) and switch them on.
Prefix-cache entries are reset at every change, so no cached KV computed under another
steering state is reused.
"""

from __future__ import annotations

import os

from yapo_fast.errors import YapoFastError
from yapo_fast.integrations import vllm_requests, vllm_vectors
from yapo_fast.integrations.vllm_hooks import SUPPORTED_FAMILIES
from yapo_fast.integrations.vllm_requests import GLOBAL_NAME
from yapo_fast.steering import Steering, SteeringHandle, check_multiplier
from yapo_fast.vector import load_vector

_NOT_LOADED = (
    "the yapo-fast vLLM plugin is not loaded in this engine's workers, so the steering op is not "
    "installed: install yapo-fast into the environment vLLM runs in (its entry point "
    "'vllm.general_plugins' -> yapo_fast) and do not exclude it with VLLM_PLUGINS; then build the LLM again"
)


def _rpc(llm, action: str, args: dict | None = None) -> list[dict]:
    try:
        results = llm.collective_rpc("yapo_fast_rpc", args=(action, args or {}))
    except NotImplementedError as exc:
        raise YapoFastError(_NOT_LOADED) from exc
    except Exception as exc:
        if "yapo_fast_rpc" in str(exc) and "not implemented" in str(exc).lower():
            raise YapoFastError(_NOT_LOADED) from exc
        raise
    for r in results:
        if not isinstance(r, dict):
            raise YapoFastError(f"unexpected answer from a vLLM worker: {r!r}")
        if r.get("error"):
            raise YapoFastError(r["error"])
        if not r.get("installed_layers"):
            raise YapoFastError(
                "the yapo-fast plugin is loaded but installed the steering op at no decoder layer of this "
                f"model: it steers the decoder layers of {SUPPORTED_FAMILIES}; check the model's "
                "architecture and YAPO_FAST_LAYERS"
            )
    return results


def _engine_shape(llm) -> tuple[int, int]:
    cfg = llm.llm_engine.model_config
    hf = cfg.hf_text_config
    return int(cfg.get_hidden_size()), int(getattr(hf, "num_hidden_layers"))


def _resolve(llm, vector, multiplier, sae) -> Steering:
    """The Steering (checked once, Steering.of), also checked against the engine's model."""
    if isinstance(vector, (str, os.PathLike)):
        vector = load_vector(vector)
    steering = Steering.of(vector, multiplier, sae=sae)
    d_model, n_layers = _engine_shape(llm)
    steering.vector.check_compatible(
        model={"d_model": d_model, "n_layers": n_layers}, n_layers=n_layers, sae=steering.sae
    )
    return steering


def _register(llm, args: dict, vector, sae) -> None:
    """Send the vector; its SAE only when some worker does not hold it yet (by weights hash)."""
    results = _rpc(llm, "register", {**args, "files": vllm_vectors.to_payload(vector, sae, send_sae=False)})
    if any(r.get("need_sae") for r in results):
        _rpc(llm, "register", {**args, "files": vllm_vectors.to_payload(vector, sae, send_sae=True)})


def _reset_prefix_cache(llm) -> None:
    reset = getattr(llm, "reset_prefix_cache", None)
    if reset is not None:
        reset()


def status(llm) -> list[dict]:
    """Per worker: the layers carrying the op, registered names, the engine-wide vector."""
    return _rpc(llm, "status")


def register_vector(llm, name: str, vector, multiplier: float | None = None, *, sae=None) -> None:
    """Make `vector` selectable per request as `name` (SamplingParams(extra_args=steer_args(name)))."""
    if not isinstance(name, str) or not name or name.lower() == "none" or name == GLOBAL_NAME:
        raise YapoFastError(f"{name!r} cannot name a steering vector: use a non-empty string other than 'none'")
    steering = _resolve(llm, vector, multiplier, sae)
    _register(llm, {"name": name, "multiplier": steering.multiplier}, steering.vector, steering.sae)
    vllm_requests.add_front_name(name)
    _reset_prefix_cache(llm)


def unregister_vector(llm, name: str) -> None:
    _rpc(llm, "unregister", {"name": name})
    vllm_requests.drop_front_name(name)
    _reset_prefix_cache(llm)


def steer_args(name: str | None, multiplier: float | None = None) -> dict:
    """extra_args for SamplingParams: steer this request with vector `name` (None: unsteered)."""
    spec = {"vector": name}
    if multiplier is not None:
        spec["multiplier"] = check_multiplier(multiplier)
    return {"yapo": spec}


def patch(llm, vector, multiplier: float | None = None, *, sae=None) -> SteeringHandle:
    """Steer every following request of `llm` (requests without their own yapo arguments) with a
    Steering, or a vector (+ its SAE) at `multiplier` (default: the vector's own), until handle.remove()."""
    steering = _resolve(llm, vector, multiplier, sae)
    _register(
        llm, {"name": GLOBAL_NAME, "multiplier": steering.multiplier, "global": True}, steering.vector, steering.sae
    )
    _reset_prefix_cache(llm)
    return SteeringHandle(steering, lambda: unpatch(llm))


def unpatch(llm) -> None:
    """Remove the engine-wide vector of patch(); per-request named vectors stay registered."""
    _rpc(llm, "unpatch")
    _reset_prefix_cache(llm)
