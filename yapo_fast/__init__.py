"""yapo-fast: fast, exact sparse activation steering (YaPO) of LLMs."""

from .errors import VectorMismatchError, YapoFastError
from .explain import explain  # yapo_fast.explain is this function; submodules: from yapo_fast.explain.X import
from .integrations.hf_hooks import patch_model, steer
from .integrations.vllm_patch import patch, register_vector, steer_args, unpatch, unregister_vector
from .model import DEFAULT_MODEL, decoder_layers, load_model, model_identity
from .sae import SAE, load_sae
from .steering import Steering, SteeringHandle, dense_steer, sparse_steer
from .train import TrainResult, train
from .vector import SteeringVector, load_vector

__all__ = [
    "DEFAULT_MODEL",
    "SAE",
    "Steering",
    "SteeringHandle",
    "SteeringVector",
    "VectorMismatchError",
    "YapoFastError",
    "decoder_layers",
    "dense_steer",
    "load_model",
    "load_sae",
    "load_vector",
    "model_identity",
    "patch_model",
    "sparse_steer",
    "steer",
    "patch",
    "unpatch",
    "register_vector",
    "unregister_vector",
    "steer_args",
    "train",
    "TrainResult",
    "explain",
]
__version__ = "0.1.0"
