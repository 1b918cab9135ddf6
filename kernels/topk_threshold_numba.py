"""TopK threshold as a numba CPU kernel: the k-th and (k+1)-th largest pre-activation per token
without ever holding the (T, d_sae) matrix.

prange over blocks of TOKEN_BLOCK tokens (so each chunk of W_enc is reused by a whole block
from cache); for each chunk of LATENT_CHUNK latents: a (block x chunk) pre-activation tile, then
merged into a per-token running top-(k+1) kept as a sorted array (insertion only when a value
beats the current minimum, which after the first chunks is rare).
"""

import numba
import numpy as np
import torch
from numba import prange

TOKEN_BLOCK = 16
LATENT_CHUNK = 256


@numba.njit(parallel=True, cache=True, fastmath={"contract"})
def _topk_kernel(x, W, b, k, kth_out, next_out, token_block, latent_chunk):
    T, d = x.shape
    d_sae = W.shape[1]
    keep = min(k + 1, d_sae)
    n_blocks = (T + token_block - 1) // token_block
    for blk in prange(n_blocks):
        t0 = blk * token_block
        nt = min(T, t0 + token_block) - t0
        best = np.full((nt, keep), -np.inf, dtype=np.float32)  # descending
        tile = np.empty((nt, latent_chunk), dtype=np.float32)
        for j0 in range(0, d_sae, latent_chunk):
            cw = min(latent_chunk, d_sae - j0)
            for tt in range(nt):
                for j in range(cw):
                    tile[tt, j] = b[j0 + j]
            for dd in range(d):
                for tt in range(nt):
                    xv = x[t0 + tt, dd]
                    for j in range(cw):
                        tile[tt, j] += xv * W[dd, j0 + j]
            for tt in range(nt):
                lo = best[tt, keep - 1]
                for j in range(cw):
                    v = tile[tt, j]
                    if v > lo:
                        pos = keep - 1
                        while pos > 0 and best[tt, pos - 1] < v:
                            best[tt, pos] = best[tt, pos - 1]
                            pos -= 1
                        best[tt, pos] = v
                        lo = best[tt, keep - 1]
        for tt in range(nt):
            kth_out[t0 + tt] = best[tt, k - 1]
            next_out[t0 + tt] = best[tt, k] if k < d_sae else -np.inf


def topk_threshold_numba(x, W_enc, b_enc, k, token_block: int = TOKEN_BLOCK, latent_chunk: int = LATENT_CHUNK):
    T = x.shape[0]
    kth = torch.empty(T, dtype=torch.float32)
    nxt = torch.empty(T, dtype=torch.float32)
    _topk_kernel(
        x.detach().to(torch.float32).contiguous().numpy(),
        W_enc.detach().to(torch.float32).contiguous().numpy(),
        b_enc.detach().to(torch.float32).contiguous().numpy(),
        int(k),
        kth.numpy(),
        nxt.numpy(),
        token_block,
        latent_chunk,
    )
    return kth, nxt
