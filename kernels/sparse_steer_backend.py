"""Which backend runs an op: forced by the caller or YAPO_FAST_KERNEL=torch|numba|triton, else
chosen by device and shape from the measurements in bench/README.md.

Why these defaults (bench/README.md, measured on the 2-core CPU box): for the fused steer the
torch path on the gathered tensors (two MKL matmuls + elementwise) beat the numba kernel at every
measured shape (T 1..4096, support 16..4096), and for the TopK threshold the chunked torch matmul
+ topk beat the numba kernel by several x. So the CPU default is torch for both ops; numba stays
selectable (YAPO_FAST_KERNEL=numba) and tested. CUDA: Triton."""

import os

import torch

from ..errors import YapoFastError

BACKENDS = ("torch", "numba", "triton", "reference")
ENV_VAR = "YAPO_FAST_KERNEL"


def pick_backend(device: torch.device, dtype: torch.dtype, *, op: str, shape=None, forced: str | None = None) -> str:
    choice = forced or os.environ.get(ENV_VAR) or None
    if choice is not None:
        if choice not in BACKENDS:
            raise YapoFastError(f"{ENV_VAR}={choice!r} is not a backend; use one of {BACKENDS}")
        if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise YapoFastError(f"the triton backend needs a CUDA device (got {device}); set TRITON_INTERPRET=1 "
                                "to run it on the CPU for testing, or use torch/numba")
        if choice in ("triton", "numba") and dtype == torch.float64:
            return "torch"  # the kernels compute in float32; float64 (gradcheck) stays exact in torch
        if choice == "numba" and device.type != "cpu":
            raise YapoFastError(f"the numba backend runs on the CPU only (got {device}); use triton or torch")
        return choice
    if dtype == torch.float64:
        return "torch"
    if device.type == "cuda":
        return "triton"
    return default_cpu_backend(op, shape)


def default_cpu_backend(op: str, shape) -> str:
    # Measured, not guessed: see the module docstring and bench/README.md.
    return "torch"
