"""Which backend runs an op: forced by the caller or YAPO_FAST_KERNEL=torch|numba|triton, else
chosen by device and shape from the measurements in bench/README.md.

Why these defaults (bench/README.md, measured on the 2-core CPU box, one thread, d_model 576):
- fused steer, decode shapes: at T <= 8 tokens with T * n <= 32 (n = dependent entries, the
  vector's negative part) the numba kernel wins: it is ~5 us of work and ~20 us of call
  overhead (numpy views of the prepared vector cached on it), against ~45-55 us for the torch
  path's op dispatch (e.g. T 1, n 8: 43 vs 56 us; T 4, n 8: 56 vs 64 us; T 1, n 32: 51 vs 59 us,
  interleaved with the torch path in one process). Beyond that MKL's matmuls win, by 1.2-5x at
  T 8..64 (numba's per-token encode is a plain loop; torch's is a gemm).
- fused steer, everything else: the torch path on the gathered tensors (two MKL matmuls +
  elementwise) beat the numba kernel at every other measured shape (T 1..4096, support 16..4096).
- TopK threshold: the chunked torch matmul + topk beat the numba kernel by several x everywhere.
numba stays selectable (YAPO_FAST_KERNEL=numba) and tested. CUDA: Triton."""

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


NUMBA_MAX_TOKENS = 8  # decode shapes only (see the module docstring)
NUMBA_MAX_WORK = 32  # T * max(n, 1): above it the torch path's matmuls win


def default_cpu_backend(op: str, shape) -> str:
    # Measured, not guessed: see the module docstring and bench/README.md (decode table).
    if op == "sparse_steer" and shape is not None:
        tokens, _, n = shape
        if tokens <= NUMBA_MAX_TOKENS and tokens * max(n, 1) <= NUMBA_MAX_WORK:
            return "numba"
    return "torch"
