"""The fused sparse steer as Triton kernels (CUDA; on the CPU under TRITON_INTERPRET=1 for tests).

Two launches, each a matmul with a fused prologue/epilogue, so nothing of size d_sae and no
(T, d_model) temporary is ever written:
  1. _coef_kernel   C[t, j] = max(a_j, -pre_tj) on active latents, 0 elsewhere,
                    pre = x @ enc_cols + enc_bias (the dependent entries only; (T, n) floats)
  2. _decode_kernel out = x + const[slot] + C @ dec_rows[slot], one read of x, one write of out
The (T, n) coefficient buffer is the only intermediate (n = number of dependent entries, small
next to d_model). Multi-slot batches: a third grid axis over slots; each program handles the rows
of its slot (rows of other slots are masked), so rows are written exactly once.
tl.dot runs with input_precision="ieee": TF32 would break exactness against the reference.

Same signature as sparse_steer_torch.steer_torch.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _coef_kernel(x_ptr, slot_ptr, enc_ptr, bias_ptr, thr_ptr, a_ptr, cut_ptr, c_ptr, T, D, N, stride_x,
                 HAS_SLOT: tl.constexpr, HAS_CUT: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    if HAS_SLOT:
        row_ok = row_ok & (tl.load(slot_ptr + rows, mask=row_ok, other=-1) == s)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        xt = tl.load(x_ptr + rows[:, None] * stride_x + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        et = tl.load(enc_ptr + s * D * N + dd[:, None] * N + cols[None, :], mask=d_ok[:, None] & col_ok[None, :],
                     other=0.0)
        acc = tl.dot(xt.to(tl.float32), et, acc, input_precision="ieee")
    pre = acc + tl.load(bias_ptr + s * N + cols, mask=col_ok, other=0.0)[None, :]
    active = pre > tl.load(thr_ptr + s * N + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_CUT:
        active = active & (pre >= tl.load(cut_ptr + rows, mask=row_ok, other=0.0)[:, None])
    a = tl.load(a_ptr + s * N + cols, mask=col_ok, other=0.0)[None, :]
    c = tl.where(active, tl.maximum(a, -pre), 0.0)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], c, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _decode_kernel(x_ptr, out_ptr, slot_ptr, const_ptr, dec_ptr, c_ptr, T, D, N, S, stride_x, stride_o,
                   HAS_SLOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    tile_ok = row_ok[:, None] & d_ok[None, :]
    # Read x fully before writing out: out may alias x (in place); tiles are disjoint per program.
    acc = tl.load(x_ptr + rows[:, None] * stride_x + dd[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_SLOT:
        slot = tl.load(slot_ptr + rows, mask=row_ok, other=-1)
    else:
        slot = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for s in range(0, S):
        mine = row_ok & (slot == s)
        const = tl.load(const_ptr + s * D + dd, mask=d_ok, other=0.0)
        acc += tl.where(mine[:, None], const[None, :], 0.0)
        for n0 in range(0, N, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            n_ok = nn < N
            c = tl.load(c_ptr + rows[:, None] * N + nn[None, :], mask=mine[:, None] & n_ok[None, :], other=0.0)
            w = tl.load(dec_ptr + s * N * D + nn[:, None] * D + dd[None, :], mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)
            acc = tl.dot(c, w, acc, input_precision="ieee")
    tl.store(out_ptr + rows[:, None] * stride_o + dd[None, :], acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


BLOCK_T, BLOCK_N, BLOCK_D = 32, 32, 64  # tl.dot needs >= 16 on every side


def steer_triton(x, out, slot, const, enc_cols, enc_bias, thresholds, coef, dec_rows, cut):
    T, D = x.shape
    S, N = coef.shape
    f32 = [t.to(torch.float32).contiguous() for t in (const, enc_cols, enc_bias, thresholds, coef, dec_rows)]
    const, enc_cols, enc_bias, thresholds, coef, dec_rows = f32
    if T == 0:
        return out
    has_slot = slot is not None
    slot_arg = slot.to(torch.int32).contiguous() if has_slot else x  # dummy pointer when unused
    has_cut = cut is not None
    cut_arg = cut.to(torch.float32).contiguous() if has_cut else enc_bias
    C = torch.zeros(T, max(N, 1), dtype=torch.float32, device=x.device)
    if N > 0:
        grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(N, BLOCK_N), S)
        _coef_kernel[grid](x, slot_arg, enc_cols, enc_bias, thresholds, coef, cut_arg, C, T, D, N, x.stride(0),
                           HAS_SLOT=has_slot, HAS_CUT=has_cut, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))
    _decode_kernel[grid](x, out, slot_arg, const, dec_rows, C, T, D, N, S, x.stride(0), out.stride(0),
                         HAS_SLOT=has_slot, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    return out
