"""THE reference of the TopK threshold op: per token, the k-th and (k+1)-th largest
pre-activation over all d_sae latents (pre = x @ W_enc + b_enc, b_dec centering already folded
into b_enc). Literal: it builds the full (T, d_sae) matrix and sorts; the kernels must not.

Tie rule (used by every TopK path in yapo_fast.kernels): latent i is among the top k of a token
iff pre_i >= kth (so every latent tied with the k-th value counts). The (k+1)-th value is
returned so a consumer can cut between the two (see topk_cut): without ties the set
{pre >= cut} equals {pre >= kth}, and a pre-activation recomputed with a different summation
order (a gathered column vs the full matmul) stays on the same side of the cut unless the gap
between the k-th and (k+1)-th value is below rounding.
"""

import torch


def topk_threshold_reference(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int):
    """x (T, d); W_enc (d, d_sae); b_enc (d_sae,). Returns (kth, next): (T,) each, float32
    (float64 for float64 inputs); next = -inf when k == d_sae."""
    cdt = torch.float64 if W_enc.dtype == torch.float64 else torch.float32
    pre = x.to(cdt) @ W_enc.to(cdt) + b_enc.to(cdt)
    d_sae = pre.shape[-1]
    values = torch.sort(pre, dim=-1, descending=True).values
    kth = values[:, k - 1]
    nxt = values[:, k] if k < d_sae else torch.full_like(kth, float("-inf"))
    return kth, nxt


def topk_cut(kth: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """The per-token cut used as `pre >= cut`: midway between the k-th and (k+1)-th value
    (== kth under ties; -inf when every latent is in the top k)."""
    return torch.where(torch.isinf(nxt), nxt, 0.5 * (kth + nxt))
