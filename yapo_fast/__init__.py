"""yapo-fast: fast, exact sparse activation steering (YaPO) of LLMs."""

from yapo_fast.errors import VectorMismatchError, YapoFastError
from yapo_fast.explain import explain  # yapo_fast.explain is this function; submodules: from yapo_fast.explain.X import
from yapo_fast.integrations.hf_hooks import patch_model, steer
from yapo_fast.integrations.vllm_patch import patch, register_vector, steer_args, unpatch, unregister_vector
from yapo_fast.model import DEFAULT_MODEL, decoder_layers, load_model, model_identity
from yapo_fast.sae.autoencoder import SAE, load_sae
from yapo_fast.steering import Steering, SteeringHandle, dense_steer, sparse_steer
from yapo_fast.train import TrainResult, train
from yapo_fast.vector import SteeringVector, load_vector

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
