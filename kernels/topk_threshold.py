"""THE dispatch point of the TopK threshold op.

    topk_threshold(x, W_enc, b_enc, k, *, backend=None) -> (kth, next)

x (T, d_model) any float dtype; W_enc (d_model, d_sae) and b_enc (d_sae,) float32 with the b_dec
centering folded into b_enc (PreparedSteer.topk_W_enc / topk_b_enc). Returns the k-th and
(k+1)-th largest pre-activation per token, (T,) each (next = -inf when k == d_sae); use
topk_cut(kth, next) as the cut `pre >= cut`. Tie rule: see topk_threshold_reference.py.

Backends: "triton" (CUDA: tiles over d_sae with a running top-k in registers), "numba" (CPU:
token blocks x latent chunks, running top-k per token), "torch" (chunked matmul + torch.topk),
"reference" (full matrix + sort). None = YAPO_FAST_KERNEL if set, else the fastest measured for
the device (docs/benchmarks.md).
"""

import torch

from yapo_fast.kernels.sparse_steer_backend import pick_backend
from yapo_fast.kernels.topk_threshold_reference import topk_cut, topk_threshold_reference  # noqa: F401 (re-export)
from yapo_fast.kernels.topk_threshold_torch import topk_threshold_torch


def topk_threshold(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *, backend: str | None = None):
    backend = pick_backend(
        x.device, W_enc.dtype, op="topk_threshold", shape=(x.shape[0], W_enc.shape[1], k), forced=backend
    )
    if backend == "triton":
        from yapo_fast.kernels.topk_threshold_triton import topk_threshold_triton

        return topk_threshold_triton(x, W_enc, b_enc, k)
    if backend == "numba":
        from yapo_fast.kernels.topk_threshold_numba import topk_threshold_numba

        return topk_threshold_numba(x, W_enc, b_enc, k)
    if backend == "reference":
        return topk_threshold_reference(x, W_enc, b_enc, k)
    return topk_threshold_torch(x, W_enc, b_enc, k)
