"""TopK threshold with plain torch ops, never holding the (T, d_sae) matrix: pre-activations are
computed in chunks of latents and merged into a running top-(k+1) per token.
Chunks of ~2048 latents keep the (T, chunk) block cache-sized while the matmul stays efficient."""

import torch


def topk_threshold_torch(x, W_enc, b_enc, k, chunk: int = 2048, token_block: int = 256):
    cdt = torch.float64 if W_enc.dtype == torch.float64 else torch.float32
    x = x.to(cdt)
    T, d_sae = x.shape[0], W_enc.shape[1]
    keep = min(k + 1, d_sae)
    kth = torch.empty(T, dtype=cdt, device=x.device)
    nxt = torch.empty(T, dtype=cdt, device=x.device)
    for t0 in range(0, T, token_block):
        xb = x[t0:t0 + token_block]
        running = None
        for j0 in range(0, d_sae, chunk):
            pre = torch.addmm(b_enc[j0:j0 + chunk], xb, W_enc[:, j0:j0 + chunk])
            cand = pre if running is None else torch.cat([running, pre], dim=1)
            running = torch.topk(cand, min(keep, cand.shape[1]), dim=1, sorted=True).values
        kth[t0:t0 + token_block] = running[:, k - 1]
        nxt[t0:t0 + token_block] = running[:, k] if k < d_sae else float("-inf")
    return kth, nxt
