"""TopK threshold as a Triton kernel (CUDA; CPU under TRITON_INTERPRET=1 for tests).

Each program owns BLOCK_T tokens and walks d_sae in tiles of BLOCK_S latents: a (BLOCK_T,
BLOCK_S) pre-activation tile by tl.dot, its top KP (power of two >= k+1) by tl.topk, merged
into the running top KP held in registers by one bitonic step (max of a descending and an
ascending sorted list is the top KP of their union, as a bitonic sequence) and a bitonic
merge. The (T, d_sae) matrix is never written; only 2 floats per token leave the kernel.
"""

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    kth_ptr,
    next_ptr,
    T,
    D,
    S,
    k,
    stride_x,
    KP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    best = tl.full((BLOCK_T, KP), float("-inf"), dtype=tl.float32)  # running top KP, descending
    for s0 in range(0, S, BLOCK_S):
        cols = s0 + tl.arange(0, BLOCK_S)
        col_ok = cols < S
        acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            xt = tl.load(
                x_ptr + rows[:, None] * stride_x + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
            )
            wt = tl.load(w_ptr + dd[:, None] * S + cols[None, :], mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(xt.to(tl.float32), wt, acc, input_precision="ieee")
        pre = acc + tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
        pre = tl.where(col_ok[None, :], pre, float("-inf"))
        tile_top = tl.topk(pre, KP)  # (BLOCK_T, KP), descending
        merged = tl.maximum(best, tl.flip(tile_top, 1))  # bitonic: holds the top KP of the union
        best = tl.sort(merged, 1, descending=True)
    idx = tl.arange(0, KP)[None, :]
    kth = tl.sum(tl.where(idx == k - 1, best, 0.0), axis=1)
    nxt = tl.max(tl.where(idx == k, best, float("-inf")), axis=1)
    tl.store(kth_ptr + rows, kth, mask=row_ok)
    tl.store(next_ptr + rows, nxt, mask=row_ok)


def topk_threshold_triton(x, W_enc, b_enc, k, block_t: int | None = None, block_d: int = 64):
    if block_t is None:  # the interpreter's cost grows with the tile; 16 is tl.dot's minimum
        block_t = 16 if os.environ.get("TRITON_INTERPRET") == "1" else 32
    T, D = x.shape
    S = W_enc.shape[1]
    KP = triton.next_power_of_2(k + 1)
    BLOCK_S = max(KP, 128)
    x = x.contiguous()
    W_enc = W_enc.to(torch.float32).contiguous()
    b_enc = b_enc.to(torch.float32).contiguous()
    kth = torch.empty(T, dtype=torch.float32, device=x.device)
    nxt = torch.empty(T, dtype=torch.float32, device=x.device)
    if T:
        _topk_kernel[(triton.cdiv(T, block_t),)](
            x, W_enc, b_enc, kth, nxt, T, D, S, k, x.stride(0), KP=KP, BLOCK_T=block_t, BLOCK_S=BLOCK_S, BLOCK_D=block_d
        )
    return kth, nxt
