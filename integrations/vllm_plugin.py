"""The vLLM plugin (entry point ``vllm.general_plugins`` -> ``yapo_fast = ...vllm_plugin:register``).

vLLM calls ``register()`` in every process (front end, engine core, workers), sometimes more than
once; it is idempotent. Before any model is built it:

1. registers the custom op ``torch.ops.yapo_fast.steer_layer(hidden, residual, layer)`` (with a
   fake implementation, so torch.compile traces it as one opaque node);
2. wraps the decoder layers' ``forward`` (Llama family; Qwen2 too) so that every installed layer
   returns ``(steer(hidden + residual), 0)``: the next layer's fused add-norm then reads the
   steered residual stream exactly. Because it happens before compilation, the compiled graph
   contains the op; with no vector active the op is one add;
3. salts vLLM's compile-cache key, so a graph compiled without the op is never served;
4. maps each scheduled token to its request's vector slot in the model runner's
   ``_prepare_inputs`` (the batch order and per-request token counts vLLM itself uses, so it is
   correct under chunked prefill and mixed prefill/decode batches): a request's arguments are
   parsed once, the per-token map is one repeat_interleave into a persistent buffer, and only
   when some request of the step is steered;
5. salts each steered request's prefix-cache key (Request.cache_salt) by vector and multiplier;
6. validates per-request steering arguments in the front end (bad names -> HTTP 400);
7. adds ``yapo_fast_rpc`` to vLLM workers, which ``yapo_fast.patch`` reaches via collective_rpc.

The wraps of vLLM internals (2-7) live in integrations/vllm_hooks.py, which refuses a vLLM version
it was not written for. Which layers get the op: ``YAPO_FAST_LAYERS`` ("all", the default, or e.g. "12,15").
Named vectors loaded once per worker when the engine has loaded its model (for ``vllm serve``):
``YAPO_FAST_VECTORS`` = ``name=vector.safetensors[@sae_dir][*multiplier],...`` (see
integrations/vllm_vectors.py).
"""

import hashlib
import os
from pathlib import Path

import torch

OP_VERSION = "yapo_fast.steer_layer/1"
_done = False
_lib = None


def register() -> None:
    global _done
    if _done:
        return
    from yapo_fast.integrations import vllm_hooks

    vllm_hooks.check_vllm_version()  # before touching any private internal
    _done = True
    _register_op()
    vllm_hooks.install(installed_layer_filter(), _source_hash())


def installed_layer_filter():
    """None (all layers) or the set of layer indices from YAPO_FAST_LAYERS."""
    raw = os.environ.get("YAPO_FAST_LAYERS", "all").strip().lower()
    if raw in ("", "all"):
        return None
    try:
        return {int(x) for x in raw.split(",") if x.strip()}
    except ValueError:
        raise ValueError(f"YAPO_FAST_LAYERS={raw!r}: give 'all' or comma-separated layer indices") from None


def _source_hash() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256(OP_VERSION.encode())
    for name in ("vllm_plugin.py", "vllm_hooks.py", "vllm_state.py"):
        digest.update((here / name).read_bytes())
    digest.update(os.environ.get("YAPO_FAST_LAYERS", "all").encode())
    return digest.hexdigest()[:16]


# ---- 1. the op -------------------------------------------------------------------------------
def _steer_layer(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
    from yapo_fast.integrations.vllm_state import STATE

    return STATE.apply(hidden, residual, layer)


def _steer_layer_fake(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(hidden)


def _register_op() -> None:
    global _lib
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    if hasattr(torch.ops, "yapo_fast") and hasattr(torch.ops.yapo_fast, "steer_layer"):
        return
    _lib = Library("yapo_fast", "FRAGMENT")
    direct_register_custom_op(
        "steer_layer", _steer_layer, mutates_args=[], fake_impl=_steer_layer_fake, target_lib=_lib
    )
