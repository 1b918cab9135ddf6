"""Which backend runs an op: forced by the caller or YAPO_FAST_KERNEL=torch|numba|triton, else
chosen by device and shape from the measurements in docs/benchmarks.md.

Why these defaults (docs/benchmarks.md, measured on the 2-core CPU box, one thread, d_model 576):
- fused steer, decode shapes: at T <= 8 tokens with n <= 512 dependent entries (the vector's
  negative part) and T * n <= 2048, the numba kernel wins: a few us of work plus ~20 us of call
  overhead (numpy views of the prepared vector are cached on it), against ~45-55 us of op
  dispatch for the torch path. Timed interleaved (torch, numba, torch, ... as in a forward), us
  median, numba vs torch: T 1 n 8: 40 vs 51; T 4 n 32: 52 vs 65; T 4 n 128: 79 vs 98; T 2 n 512:
  180 vs 226; T 8 n 128: 116 vs 116 (a tie, numba's); each path alone the gap is wider (T 1 n 8:
  30 vs 43). Beyond, the torch path's gemms win (T 16 n 128: 1.20x, T 8 n 512: 1.19x, T 16 n 512:
  1.55x slower in numba), since numba's encode is a plain loop per token block.
- fused steer, everything else: the torch path on the gathered tensors (two MKL matmuls +
  elementwise) beat the numba kernel at every larger measured shape (T up to 4096, support up to 4096).
- TopK threshold: the chunked torch matmul + topk beat the numba kernel by several x everywhere.
numba stays selectable (YAPO_FAST_KERNEL=numba) and tested. CUDA: Triton."""

import os

import torch

from yapo_fast.errors import YapoFastError

BACKENDS = ("torch", "numba", "triton", "reference")
ENV_VAR = "YAPO_FAST_KERNEL"


def pick_backend(device: torch.device, dtype: torch.dtype, *, op: str, shape=None, forced: str | None = None) -> str:
    choice = forced or os.environ.get(ENV_VAR) or None
    if choice is not None:
        if choice not in BACKENDS:
            raise YapoFastError(f"{ENV_VAR}={choice!r} is not a backend; use one of {BACKENDS}")
        if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise YapoFastError(
                f"the triton backend needs a CUDA device (got {device}); set TRITON_INTERPRET=1 "
                "to run it on the CPU for testing, or use torch/numba"
            )
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


# The numba region (module docstring; bench/results/bench_sparse_steer_decode_interleaved.md).
NUMBA_MAX_TOKENS = 8
NUMBA_MAX_DEPENDENT = 512
NUMBA_MAX_WORK = 2048  # T * n


def default_cpu_backend(op: str, shape) -> str:
    # Measured, not guessed: see the module docstring and docs/benchmarks.md (decode table).
    if op == "sparse_steer" and shape is not None:
        tokens, _, n = shape
        if tokens <= NUMBA_MAX_TOKENS and n <= NUMBA_MAX_DEPENDENT and tokens * n <= NUMBA_MAX_WORK:
            return "numba"
    return "torch"
