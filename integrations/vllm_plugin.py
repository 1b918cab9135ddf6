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

Which layers get the op: ``YAPO_FAST_LAYERS`` ("all", the default, or e.g. "12,15").
Named vectors loaded at start-up (for ``vllm serve``): ``YAPO_FAST_VECTORS`` =
``name=vector.safetensors[@sae_dir][*multiplier],...`` (see integrations/vllm_vectors.py).
"""

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger("yapo_fast.vllm")

OP_VERSION = "yapo_fast.steer_layer/1"
_done = False
_lib = None


def register() -> None:
    global _done
    if _done:
        return
    _done = True
    _register_op()
    _patch_decoder_layers()
    _salt_compile_cache()
    _patch_model_runner()
    _patch_request_salt()
    _patch_front_end_validation()
    _add_worker_rpc()


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
    for name in ("vllm_plugin.py", "vllm_state.py"):
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


# ---- 2. decoder layers -----------------------------------------------------------------------
def _decoder_layer_classes():
    import importlib

    out = []
    for module, cls in (
        ("vllm.model_executor.models.llama", "LlamaDecoderLayer"),
        ("vllm.model_executor.models.qwen2", "Qwen2DecoderLayer"),
    ):
        try:
            out.append(getattr(importlib.import_module(module), cls))
        except Exception as exc:  # an architecture vLLM dropped or renamed: the others still work
            logger.debug("yapo_fast: cannot patch %s.%s: %s", module, cls, exc)
    return out


def _patch_decoder_layers() -> None:
    from vllm.model_executor.models.utils import extract_layer_index

    from yapo_fast.integrations.vllm_state import STATE

    wanted = installed_layer_filter()
    for cls in _decoder_layer_classes():
        if getattr(cls, "_yapo_fast_patched", False):
            continue
        orig_init, orig_forward = cls.__init__, cls.forward

        @functools.wraps(orig_init)
        def __init__(self, *args, _orig=orig_init, **kwargs):
            _orig(self, *args, **kwargs)
            prefix = kwargs.get("prefix", "")
            try:
                layer = extract_layer_index(prefix) if prefix else None
            except Exception:
                layer = None
            self._yapo_layer = layer if (layer is not None and (wanted is None or layer in wanted)) else None
            if self._yapo_layer is not None:
                STATE.installed_layers.add(layer)
                _load_startup_vectors()

        @functools.wraps(orig_forward)
        def forward(self, positions, hidden_states, residual, *args, _orig=orig_forward, **kwargs):
            hidden_states, residual = _orig(self, positions, hidden_states, residual, *args, **kwargs)
            if self._yapo_layer is None:
                return hidden_states, residual
            steered = torch.ops.yapo_fast.steer_layer(hidden_states, residual, self._yapo_layer)
            # The next layer (or the final norm) forms hidden + residual = steered + 0 exactly.
            return steered, torch.zeros_like(residual)

        cls.__init__, cls.forward, cls._yapo_fast_patched = __init__, forward, True


def _load_startup_vectors() -> None:
    from yapo_fast.integrations.vllm_state import STATE
    from yapo_fast.integrations.vllm_vectors import load_startup_vectors

    if getattr(STATE, "_startup_loaded", False):
        return
    STATE._startup_loaded = True
    for name, (vector, sae, m) in load_startup_vectors().items():
        STATE.register(name, vector, sae, m)


# ---- 3. compile cache ------------------------------------------------------------------------
def _salt_compile_cache() -> None:
    from vllm.config import VllmConfig

    if getattr(VllmConfig.compute_hash, "_yapo_fast", False):
        return
    orig = VllmConfig.compute_hash
    salt = _source_hash()

    @functools.wraps(orig)
    def compute_hash(self, *args, **kwargs):
        base = orig(self, *args, **kwargs)
        return hashlib.sha256(f"{base}|yapo_fast:{salt}".encode()).hexdigest()[: len(base)]

    compute_hash._yapo_fast = True
    VllmConfig.compute_hash = compute_hash


# ---- 4. token -> slot map --------------------------------------------------------------------
def _patch_model_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from yapo_fast.integrations.vllm_state import STATE

    if getattr(GPUModelRunner, "_yapo_fast_patched", False):
        return
    orig_prepare, orig_execute = GPUModelRunner._prepare_inputs, GPUModelRunner.execute_model

    @functools.wraps(orig_prepare)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        STATE.forget_requests(getattr(scheduler_output, "finished_req_ids", ()) or ())
        if STATE.active:
            reqs = self.requests

            def extra_args_of(rid):  # called once per request (then cached by id)
                return getattr(getattr(reqs.get(rid), "sampling_params", None), "extra_args", None)

            req_ids = self.input_batch.req_ids[: len(num_scheduled_tokens)]
            STATE.build_plan_ids(STATE.request_slots(req_ids, extra_args_of), num_scheduled_tokens)
        else:
            STATE.clear_plan()
        return orig_prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    @functools.wraps(orig_execute)
    def execute_model(self, *args, **kwargs):
        try:
            return orig_execute(self, *args, **kwargs)
        finally:
            STATE.clear_plan()  # dummy/profile runs never see a stale map

    GPUModelRunner._prepare_inputs, GPUModelRunner.execute_model = _prepare_inputs, execute_model
    GPUModelRunner._yapo_fast_patched = True


# ---- 5. prefix cache -------------------------------------------------------------------------
def _patch_request_salt() -> None:
    from vllm.v1.request import Request

    from yapo_fast.integrations.vllm_state import cache_salt_for, parse_request_args

    if getattr(Request, "_yapo_fast_patched", False):
        return
    orig = Request.__init__

    @functools.wraps(orig)
    def __init__(self, *args, **kwargs):
        sp = kwargs.get("sampling_params")
        try:
            salt = cache_salt_for(parse_request_args(getattr(sp, "extra_args", None)))
        except ValueError:
            salt = "yapo:invalid"
        if salt is not None:
            kwargs["cache_salt"] = f"{kwargs.get('cache_salt') or ''}|{salt}"
        orig(self, *args, **kwargs)

    Request.__init__, Request._yapo_fast_patched = __init__, True


# ---- 6. front-end validation -----------------------------------------------------------------
def _patch_front_end_validation() -> None:
    try:
        from vllm.v1.engine.input_processor import InputProcessor
    except Exception as exc:
        logger.warning("yapo_fast: cannot validate steering requests in the front end: %s", exc)
        return
    from yapo_fast.integrations.vllm_vectors import check_request_args

    if getattr(InputProcessor, "_yapo_fast_patched", False):
        return
    orig = InputProcessor._validate_params

    from vllm.exceptions import VLLMValidationError

    from yapo_fast.errors import YapoFastError

    class YapoFastRequestError(VLLMValidationError, YapoFastError):
        """A bad steering request: vLLM's server answers its VLLMClientError side with HTTP 400
        (a plain ValueError would become an empty 500 in AsyncLLM.generate)."""

    @functools.wraps(orig)
    def _validate_params(self, params, *args, **kwargs):
        try:
            check_request_args(getattr(params, "extra_args", None))
        except YapoFastError as exc:
            raise YapoFastRequestError(str(exc), parameter="vllm_xargs") from None
        return orig(self, params, *args, **kwargs)

    InputProcessor._validate_params, InputProcessor._yapo_fast_patched = _validate_params, True


# ---- 7. worker RPC ---------------------------------------------------------------------------
def _add_worker_rpc() -> None:
    from vllm.v1.worker.worker_base import WorkerBase

    from yapo_fast.integrations.vllm_rpc import yapo_fast_rpc

    WorkerBase.yapo_fast_rpc = yapo_fast_rpc
