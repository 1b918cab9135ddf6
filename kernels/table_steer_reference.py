"""THE reference of the table step (kernels/table_steer.py): a loop over tokens, each steered by
the single-vector reference op of its row's steering."""

from __future__ import annotations

import torch

from yapo_fast.kernels.sparse_steer_reference import dense_steer_reference, sparse_steer_reference


def table_steer_reference(h: torch.Tensor, slot: torch.Tensor, rows: dict) -> torch.Tensor:
    """h (T, d_model); slot (T,) row per token (0: unsteered); rows: {row: (sae or None, vector, m)}
    with a (d_sae,) latent for a YaPO vector (sae given) or a (d_model,) dense vector."""
    out = h.clone()
    for t, r in enumerate(slot.tolist()):
        if r == 0:
            continue
        sae, v, m = rows[r]
        one = h[t : t + 1]
        out[t] = (sparse_steer_reference(one, sae, v, m) if sae is not None else dense_steer_reference(one, v, m))[0]
    return out
