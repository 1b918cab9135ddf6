"""Checkpoints: one safetensors file (atomic write) holding v, the AdamW moments, the torch RNG
state, and in its metadata the step, scheduler and optimizer settings and the run's fingerprint.
A killed run resumes from the last one and ends with the vector an uninterrupted run ends with."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from yapo_fast.atomic import atomic_path
from yapo_fast.errors import YapoFastError


def save_checkpoint(path: Path, *, v, optimizer, scheduler, step: int, fingerprint: str, stopped: bool = False) -> None:
    from safetensors.torch import save_file

    opt = optimizer.state_dict()
    tensors = {"v": v.detach().cpu().contiguous(), "rng": torch.get_rng_state()}
    for key, value in opt["state"].get(0, {}).items():
        tensors[f"opt.{key}"] = (
            value.detach().cpu().contiguous().reshape(-1) if value.dim() == 0 else value.detach().cpu().contiguous()
        )
    sched = {k: val for k, val in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {
        "step": step,
        "stopped": stopped,
        "fingerprint": fingerprint,
        "param_groups": opt["param_groups"],
        "scheduler": sched,
        "scalar_opt_keys": [k for k, val in opt["state"].get(0, {}).items() if val.dim() == 0],
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"yapo_fast_checkpoint": json.dumps(meta)})


def load_checkpoint(path: Path, *, v, optimizer, scheduler, fingerprint: str) -> tuple[int, bool]:
    """Restore v, optimizer, scheduler and RNG in place; return (step to continue from, stopped early)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["yapo_fast_checkpoint"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise YapoFastError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); delete it to start "
            "over or pass resume=False"
        ) from exc
    if meta["fingerprint"] != fingerprint:
        raise YapoFastError(
            f"checkpoint {path} belongs to a different run (other data, model, SAE or settings); "
            "delete it, choose another output path, or pass resume=False (--no-resume) to start over"
        )
    with torch.no_grad():
        v.copy_(tensors["v"].to(v.device, v.dtype))
    state = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            name = key[4:]
            state[name] = value.reshape(()) if name in meta["scalar_opt_keys"] else value.to(v.device)
    optimizer.load_state_dict({"state": {0: state} if state else {}, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    torch.set_rng_state(tensors["rng"])
    return int(meta["step"]), bool(meta.get("stopped", False))
