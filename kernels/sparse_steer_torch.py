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


def steer_delta(x, enc_cols, enc_bias, thresholds, coef, dec_rows, cut):
    """sum over dependent entries of max(a_i, -z_i) * W_dec[i], for tokens x (T, d) of one slot."""
    pre = x @ enc_cols + enc_bias
    active = pre > thresholds
    if cut is not None:
        active &= pre >= cut[:, None]
    z = torch.where(active, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))
    return torch.maximum(coef, -z) @ dec_rows


def steer_torch(x, out, slot, const, enc_cols, enc_bias, thresholds, coef, dec_rows, cut):
    cdt = const.dtype
    x32 = x.to(cdt)
    if slot is None:
        result = x32 + const[0] + steer_delta(x32, enc_cols[0], enc_bias[0], thresholds[0], coef[0], dec_rows[0], cut)
    else:
        result = x32.clone()
        for s in torch.unique(slot[slot >= 0]).tolist():
            rows = torch.nonzero(slot == s).flatten()
            xs = x32[rows]
            result[rows] = xs + const[s] + steer_delta(xs, enc_cols[s], enc_bias[s], thresholds[s], coef[s],
                                                       dec_rows[s], None if cut is None else cut[rows])
    out.copy_(result)
    return out
