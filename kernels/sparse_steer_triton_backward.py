"""Backward of the fused sparse steer as Triton kernels (CUDA; CPU under TRITON_INTERPRET=1 for
tests). Used by SparseSteerFunction (sparse_steer.py) when the forward ran on Triton.

With g the upstream gradient, for token t of slot s and dependent entry j (a_j = m*v_j <= 0,
z_tj = pre_tj where active, else 0; see sparse_steer_prepare.py):
    gd_tj    = g_t . dec_rows[s][j]
    passes   = z_tj + a_j > 0                    (ReLU'(z + a); torch's relu'(0) = 0)
    capped   = active_tj and not passes          (the feature is held at |a_j|: h's path is cut)
    grad_h_t = g_t - sum_j capped_tj * gd_tj * enc_cols[s][:, j]
    dv[s, j] = sum over tokens t of slot s of passes_tj * gd_tj   (times m: the caller's)
Both kernels recompute pre (the gathered encode) instead of saving anything of size (T, n).

- _grad_h_kernel: one launch, a (BLOCK_T x BLOCK_D) tile of grad_h per program, looping over the
  support in blocks (same tiling as the forward's "tiles" variant).
- _grad_v_kernel: programs over (support block, token split, slot); each reduces its tokens to
  BLOCK_N partial sums; the launcher adds the SPLITS partials (deterministic, no atomics).
The constant entries (a_j > 0: dv_j = m * sum_t g_t . W_dec[j], independent of h) are a column
sum and a small matvec, done in torch by the caller.
"""

import torch
import triton
import triton.language as tl

from yapo_fast.kernels.sparse_steer_triton import (
    BLOCK_K,
    BLOCK_N,
    BLOCK_T,
    TILES_BLOCK_D,
    encode_block,
    pad_support,
    row_slots,
)


@triton.jit
def project_block(
    g_ptr,
    stride_g,
    rows,
    mine,
    dec_ptr,
    s,
    D,
    N,
    nn,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """gd[t, j] = g_t . dec_rows[s][j] for rows x entries nn (0 on rows not `mine`)."""
    gd = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < D
        gt = tl.load(g_ptr + rows[:, None] * stride_g + kk[None, :], mask=mine[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(
            dec_ptr + s * N * D + nn[None, :] * D + kk[:, None], mask=k_ok[:, None] & (nn < N)[None, :], other=0.0
        )  # dec_rows[s][nn, kk] transposed: (BLOCK_K, BLOCK_N)
        gd = tl.dot(gt.to(tl.float32), wt, gd, input_precision="ieee")
    return gd


@triton.jit
def _grad_h_kernel(
    x_ptr,
    g_ptr,
    gh_ptr,
    slot_ptr,
    enc_ptr,
    bias_ptr,
    thr_ptr,
    a_ptr,
    dec_ptr,
    cut_ptr,
    T,
    D,
    N,
    S,
    stride_x,
    stride_g,
    stride_gh,
    HAS_SLOT: tl.constexpr,
    HAS_CUT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    slot, cut = row_slots(slot_ptr, cut_ptr, rows, row_ok, HAS_SLOT, HAS_CUT)
    acc = tl.load(g_ptr + rows[:, None] * stride_g + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(
        tl.float32
    )
    for s in range(0, S):
        mine = slot == s
        if tl.sum(mine.to(tl.int32), axis=0) > 0:
            for n0 in range(0, N, BLOCK_N):
                nn = n0 + tl.arange(0, BLOCK_N)
                n_ok = nn < N
                pre, active = encode_block(
                    x_ptr,
                    stride_x,
                    rows,
                    mine,
                    enc_ptr,
                    bias_ptr,
                    thr_ptr,
                    cut,
                    s,
                    D,
                    N,
                    nn,
                    HAS_CUT,
                    BLOCK_T,
                    BLOCK_N,
                    BLOCK_K,
                )
                gd = project_block(g_ptr, stride_g, rows, mine, dec_ptr, s, D, N, nn, BLOCK_T, BLOCK_N, BLOCK_K)
                a = tl.load(a_ptr + s * N + nn, mask=n_ok, other=0.0)[None, :]
                capped = active & ~((tl.where(active, pre, 0.0) + a) > 0)
                w = tl.where(capped, -gd, 0.0)
                et = tl.load(
                    enc_ptr + s * D * N + dd[None, :] * N + nn[:, None], mask=n_ok[:, None] & d_ok[None, :], other=0.0
                )  # enc_cols[s][dd, nn] transposed: (BLOCK_N, BLOCK_D)
                acc = tl.dot(w, et, acc, input_precision="ieee")
    tl.store(gh_ptr + rows[:, None] * stride_gh + dd[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _grad_v_kernel(
    x_ptr,
    g_ptr,
    part_ptr,
    slot_ptr,
    enc_ptr,
    bias_ptr,
    thr_ptr,
    a_ptr,
    dec_ptr,
    cut_ptr,
    T,
    D,
    N,
    S,
    stride_x,
    stride_g,
    TILES_PER_SPLIT,
    HAS_SLOT: tl.constexpr,
    HAS_CUT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    nn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = nn < N
    split = tl.program_id(1)
    s = tl.program_id(2)
    a = tl.load(a_ptr + s * N + nn, mask=n_ok, other=0.0)[None, :]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(0, TILES_PER_SPLIT):
        rows = (split * TILES_PER_SPLIT + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        slot, cut = row_slots(slot_ptr, cut_ptr, rows, row_ok, HAS_SLOT, HAS_CUT)
        mine = slot == s
        if tl.sum(mine.to(tl.int32), axis=0) > 0:
            pre, active = encode_block(
                x_ptr,
                stride_x,
                rows,
                mine,
                enc_ptr,
                bias_ptr,
                thr_ptr,
                cut,
                s,
                D,
                N,
                nn,
                HAS_CUT,
                BLOCK_T,
                BLOCK_N,
                BLOCK_K,
            )
            gd = project_block(g_ptr, stride_g, rows, mine, dec_ptr, s, D, N, nn, BLOCK_T, BLOCK_N, BLOCK_K)
            passes = (tl.where(active, pre, 0.0) + a) > 0
            acc += tl.sum(tl.where(passes & mine[:, None], gd, 0.0), axis=0)
    tl.store(part_ptr + (split * S + s) * N + nn, acc, mask=n_ok)


MAX_SPLITS = 64  # token splits of the dv reduction: enough programs to fill a GPU at large T


def steer_backward_triton(x, g, slot, enc_cols, enc_bias, thresholds, coef, dec_rows, cut, *, need_h=True, need_v=True):
    """x, g: (T, D) (any float dtype, read as float32); slot: (T,) or None; per-slot tensors as in
    steer_triton; cut: (T,) or None. Returns (grad_h (T, D) float32 or None, dv (S, n) float32 or
    None): dv without the multiplier (the caller multiplies by each slot's m)."""
    T, D = x.shape
    S, n = coef.shape
    x, g = x.contiguous(), g.contiguous()
    enc_cols, enc_bias, thresholds, coef, dec_rows = pad_support(enc_cols, enc_bias, thresholds, coef, dec_rows)
    N = coef.shape[1]
    has_slot, has_cut = slot is not None, cut is not None
    slot_arg = slot.to(torch.int32).contiguous() if has_slot else coef
    cut_arg = cut.to(torch.float32).contiguous() if has_cut else coef
    weights = (slot_arg, enc_cols, enc_bias, thresholds, coef, dec_rows, cut_arg, T, D, N, S)
    grad_h = dv = None
    if need_h:
        grad_h = torch.empty(T, D, dtype=torch.float32, device=x.device)
        if T:
            _grad_h_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(D, TILES_BLOCK_D))](
                x,
                g,
                grad_h,
                *weights,
                x.stride(0),
                g.stride(0),
                grad_h.stride(0),
                HAS_SLOT=has_slot,
                HAS_CUT=has_cut,
                BLOCK_T=BLOCK_T,
                BLOCK_N=BLOCK_N,
                BLOCK_K=BLOCK_K,
                BLOCK_D=TILES_BLOCK_D,
            )
    if need_v:
        tiles = max(1, triton.cdiv(T, BLOCK_T))
        splits = min(MAX_SPLITS, tiles)
        per_split = triton.cdiv(tiles, splits)
        parts = torch.zeros(splits, S, N, dtype=torch.float32, device=x.device)
        if T:
            _grad_v_kernel[(triton.cdiv(N, BLOCK_N), splits, S)](
                x,
                g,
                parts,
                *weights,
                x.stride(0),
                g.stride(0),
                per_split,
                HAS_SLOT=has_slot,
                HAS_CUT=has_cut,
                BLOCK_T=BLOCK_T,
                BLOCK_N=BLOCK_N,
                BLOCK_K=BLOCK_K,
            )
        dv = parts.sum(0)[:, :n]
    return grad_h, dv
