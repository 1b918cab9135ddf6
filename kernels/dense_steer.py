"""Dense steering h' = h + m*v (BiPO, CAA): the dispatch point beside the sparse op's.

One path on every device: an add in float32, cast back (exact, bandwidth-bound; a fused kernel
has nothing to save). The reference is kernels/sparse_steer_reference.dense_steer_reference.
"""

from __future__ import annotations

import torch


def dense_steer(h: torch.Tensor, v: torch.Tensor, multiplier: float) -> torch.Tensor:
    v32 = v.to(device=h.device, dtype=torch.float32)
    if h.dtype == torch.float32:
        return h + multiplier * v32
    return (h.to(torch.float32) + multiplier * v32).to(h.dtype)
