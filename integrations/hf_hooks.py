"""Steering a transformers model: a forward hook on decoder layer L's output.

    with yapo_fast.steer(model, vector, multiplier=1.0, sae=sae):
        model.generate(...)

    handle = yapo_fast.patch_model(model, vector, sae=sae); ...; handle.remove()

Every position is steered (prompt and generated tokens). Removing the hook restores the model
exactly: the hook is the only thing that changes, no weight is touched.
"""

from __future__ import annotations

import contextlib

import torch

from yapo_fast.errors import YapoFastError
from yapo_fast.model import check_layer, decoder_layers, model_identity
from yapo_fast.steering import Steering, SteeringHandle
from yapo_fast.vector import SteeringVector


def _replace_hidden(output, new_hidden):
    if isinstance(output, torch.Tensor):
        return new_hidden
    if isinstance(output, tuple):
        return (new_hidden, *output[1:])
    raise YapoFastError(f"decoder layer returned {type(output).__name__}; expected a tensor or a tuple")


def _in_graph() -> bool:
    """Being traced by torch.compile or captured into a CUDA graph: no host read of a value there."""
    # is_initialized, not is_available: this runs per steered layer call, and no capture happens
    # before CUDA is initialised
    return torch.compiler.is_compiling() or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


def _check_steered(steered: torch.Tensor, hidden: torch.Tensor, layer: int, m: float) -> None:
    """NaN or inf must not flow on silently into later layers and the logits: one reduction per
    steered layer call (cheap next to the layer itself) and, only on failure, whose fault it is.
    Skipped while compiling or capturing a graph (the check reads a value on the host)."""
    if _in_graph() or bool(torch.isfinite(steered).all()):
        return
    if not bool(torch.isfinite(hidden).all()):
        raise YapoFastError(
            f"the hidden states of decoder layer {layer} already hold NaN or inf before steering: "
            "the model produced them (check its weights and dtype; try float32)"
        )
    raise YapoFastError(
        f"steering layer {layer} at multiplier {m} produced NaN or inf from finite hidden "
        "states (overflow): lower the multiplier, or steer in float32"
    )


def patch_model(
    model, vector: "SteeringVector | Steering", multiplier: float | None = None, *, sae=None, check: bool = True
) -> SteeringHandle:
    """Steer `model` at the vector's layer until handle.remove(). Takes a Steering, or a vector
    (with `sae` for yapo vectors; multiplier None: the vector's own)."""
    steering = Steering.of(vector, multiplier, sae=sae)
    layer = check_layer(model, steering.layer)
    if check:
        steering.vector.check_compatible(model=model_identity(model), sae=steering.sae)
    steer_fn, m = steering.steer_fn(), steering.multiplier

    def hook(_module, _inputs, output):
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        steered = steer_fn(hidden)
        _check_steered(steered, hidden, layer, m)
        return _replace_hidden(output, steered)

    return SteeringHandle(steering, decoder_layers(model)[layer].register_forward_hook(hook).remove)


@contextlib.contextmanager
def steer(model, vector: "SteeringVector | Steering", multiplier: float | None = None, *, sae=None, check: bool = True):
    """Context manager form of patch_model."""
    handle = patch_model(model, vector, multiplier, sae=sae, check=check)
    try:
        yield handle
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_layer_output(model, layer: int):
    """Record decoder layer `layer`'s output hidden states (a list, one tensor per forward)."""
    check_layer(model, layer)
    seen: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        seen.append((output if isinstance(output, torch.Tensor) else output[0]).detach())

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
