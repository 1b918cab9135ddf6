"""The worker side of ``yapo_fast.patch`` / ``register_vector``: one method that the plugin adds
to vLLM's workers and the front end reaches with ``llm.collective_rpc("yapo_fast_rpc", ...)``.
Arguments and results are plain data (names, numbers, file bytes), so they cross vLLM's
msgpack-encoded process boundaries without insecure serialization."""

from __future__ import annotations

from yapo_fast.integrations.vllm_requests import GLOBAL_NAME
from yapo_fast.integrations.vllm_state import STATE


def yapo_fast_rpc(worker, action: str, args: dict | None = None) -> dict:
    args = args or {}
    runner = getattr(worker, "model_runner", None)
    device = getattr(runner, "device", None)
    if device is not None:
        STATE.device = device
    if action == "register":
        from yapo_fast.integrations.vllm_vectors import from_payload

        vector, sae = from_payload(args["files"])
        if vector.is_sparse and sae is None:
            return {"need_sae": True, "installed_layers": sorted(STATE.installed_layers)}
        if vector.layer not in STATE.installed_layers:
            return {
                "error": f"the steering op is not installed at layer {vector.layer} in this engine "
                f"(installed: {sorted(STATE.installed_layers)}); start the engine with "
                f"YAPO_FAST_LAYERS=all or including {vector.layer}"
            }
        STATE.register(args["name"], vector, sae, args.get("multiplier"))
        if args.get("global"):
            STATE.set_global(args["name"], args.get("multiplier"))
    elif action == "unregister":
        STATE.unregister(args["name"])
    elif action == "unpatch":
        STATE.unregister(GLOBAL_NAME)
        STATE.set_global(None)
    elif action != "status":
        return {"error": f"unknown yapo_fast rpc action {action!r}"}
    return {
        "installed_layers": sorted(STATE.installed_layers),
        "vectors": sorted(STATE.vectors),
        "global": None if STATE.global_spec is None else list(STATE.global_spec),
    }
