"""TopK threshold with plain torch ops, never holding the (T, d_sae) matrix: pre-activations are
computed in tiles of at most TILE_FLOATS floats (token block x latent chunk) and merged into a
running top-(k+1) per token. The tile bound keeps memory flat in T; a small T gets one wide
chunk (fewer merges: at T=1 the whole 9216 latents fit in one 36 KB tile).
"""

import torch

TILE_FLOATS = 1 << 21  # 8 MB of float32 pre-activations at a time
TOKEN_BLOCK = 256
MIN_CHUNK = 2048


def topk_threshold_torch(x, W_enc, b_enc, k, tile_floats: int = TILE_FLOATS):
    cdt = torch.float64 if W_enc.dtype == torch.float64 else torch.float32
    x = x.to(cdt)
    T, d_sae = x.shape[0], W_enc.shape[1]
    keep = min(k + 1, d_sae)
    kth = torch.empty(T, dtype=cdt, device=x.device)
    nxt = torch.empty(T, dtype=cdt, device=x.device)
    rows = max(1, min(T, TOKEN_BLOCK))
    chunk = max(MIN_CHUNK, tile_floats // rows)
    for t0 in range(0, T, rows):
        xb = x[t0 : t0 + rows]
        running = None
        for j0 in range(0, d_sae, chunk):
            pre = torch.addmm(b_enc[j0 : j0 + chunk], xb, W_enc[:, j0 : j0 + chunk])
            cand = pre if running is None else torch.cat([running, pre], dim=1)
            # sorted=False while merging; one sort at the end gives the k-th and (k+1)-th.
            running = torch.topk(cand, min(keep, cand.shape[1]), dim=1, sorted=False).values
        best = torch.sort(running, dim=1, descending=True).values
        kth[t0 : t0 + rows] = best[:, k - 1]
        nxt[t0 : t0 + rows] = best[:, k] if k < d_sae else float("-inf")
    return kth, nxt
