"""The fused sparse steer written with plain torch ops on the gathered (prepared) tensors.

It does only the unavoidable work (h @ enc_cols for the dependent entries, coef @ dec_rows),
so on CPU it is a strong baseline, and it is the backend for float64 (gradcheck) and for any
device without a kernel. Same signature as the numba and Triton kernels:

    steer_torch(x, out, slot, const, enc_cols, enc_bias, thresholds, coef, dec_rows, cut)

x, out: (T, d) (out may alias x); slot: (T,) int32/int64 slot per token (-1 unsteered) or None
(every token uses slot 0); const (S, d); enc_cols (S, d, n); enc_bias, thresholds, coef (S, n);
dec_rows (S, n, d); cut: (T,) per-token TopK cut or None. Math: see sparse_steer_prepare.py.
"""

import torch


def steer_coef(x, enc_cols, enc_bias, thresholds, coef, cut):
    """(T, n) coefficients max(a_i, -z_i) of the dependent entries, for tokens x of one slot."""
    pre = torch.addmm(enc_bias, x, enc_cols)
    active = pre > thresholds
    if cut is not None:
        active &= pre >= cut[:, None]
    # z = pre where active, else 0; max(a, -0) = 0 because a <= 0, so inactive -> 0 (times the
    # mask: +-0, the same sums). Not torch.where(..., 0.0): on CPU it costs ~2x the three ops here
    # (86 vs 41 us at T 512, n 32; ~7% of the headline's floor).
    return torch.maximum(coef, -pre).mul_(active)


def steer_one(x, out, const, enc_cols, enc_bias, thresholds, coef, dec_rows, cut):
    """out = x + const + coef @ dec_rows for one vector: one elementwise pass, then a gemm that
    accumulates in place (BLAS beta=1) when out is float32 and contiguous. c is computed before
    out is touched, so out may alias x (in place)."""
    c = steer_coef(x, enc_cols, enc_bias, thresholds, coef, cut)
    if out.dtype == x.dtype and out.is_contiguous():
        torch.add(x, const, out=out)
        return out.addmm_(c, dec_rows)
    out.copy_(torch.addmm(x + const, c, dec_rows))
    return out


def steer_torch(x, out, slot, const, enc_cols, enc_bias, thresholds, coef, dec_rows, cut):
    x32 = x.to(const.dtype)
    if slot is None:
        return steer_one(x32, out, const[0], enc_cols[0], enc_bias[0], thresholds[0], coef[0], dec_rows[0], cut)
    result = x32.clone()
    for s in torch.unique(slot[slot >= 0]).tolist():
        rows = torch.nonzero(slot == s).flatten()
        result[rows] = steer_one(
            x32[rows],
            torch.empty_like(x32[rows]),
            const[s],
            enc_cols[s],
            enc_bias[s],
            thresholds[s],
            coef[s],
            dec_rows[s],
            None if cut is None else cut[rows],
        )
    out.copy_(result)
    return out
