"""The fused sparse steer as a numba CPU kernel, parallel over tokens (prange).

Per token, in one pass and without any (T, n) or (T, d_sae) temporary:
  pre_j = enc_bias_j + x . enc_cols[:, j]      (the dependent entries only)
  c_j   = max(a_j, -pre_j) if active_j else 0  (active: see sparse_steer_prepare.py)
  out   = x + const + sum_{c_j != 0} c_j * dec_rows[j]
Inactive latents give c_j = 0, and their decoder row is skipped: with JumpReLU/TopK most of the
support is inactive on most tokens, so the decode is usually far below a dense coef @ dec_rows.

Same signature as sparse_steer_torch.steer_torch. Computes in float32; bf16/fp16 are converted
at the boundary. cache=True: the first call compiles (seconds) and caches to __pycache__.
"""

import numba
import numpy as np
import torch
from numba import prange

# 'contract' lets LLVM fuse multiply-adds; no 'ninf'/'nnan' (the TopK cut may be -inf).
_FASTMATH = {"contract"}


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _steer_kernel(x, out, slot, has_slot, const, enc_cols, enc_bias, thresholds, coef, dec_rows, cut, has_cut):
    T, d = x.shape
    n = coef.shape[1]
    for t in prange(T):
        s = slot[t] if has_slot else 0
        if s < 0:
            for j in range(d):
                out[t, j] = x[t, j]
            continue
        # Encode first: out may alias x (in place), so x[t] is read fully before out[t] is written.
        pre = enc_bias[s].copy()
        for dd in range(d):
            xv = x[t, dd]
            for j in range(n):
                pre[j] += xv * enc_cols[s, dd, j]
        lo = cut[t] if has_cut else -np.inf
        for dd in range(d):
            out[t, dd] = x[t, dd] + const[s, dd]
        for j in range(n):
            p = pre[j]
            if p > thresholds[s, j] and p >= lo:
                c = max(coef[s, j], -p)
                if c != 0.0:
                    for dd in range(d):
                        out[t, dd] += c * dec_rows[s, j, dd]


_NO_INTS = np.zeros(1, dtype=np.int64)
_NO_FLOATS = np.zeros(1, dtype=np.float32)


def _np32(t):
    return t.detach().to(torch.float32).contiguous().numpy()


def steer_numba(x, out, slot, const, enc_cols, enc_bias, thresholds, coef, dec_rows, cut):
    if x.device.type != "cpu":
        raise ValueError("the numba kernel runs on CPU tensors")
    direct = out.dtype == torch.float32 and out.is_contiguous()
    x32 = x.contiguous() if x.dtype == torch.float32 else x.to(torch.float32)
    out32 = out if direct else torch.empty(out.shape, dtype=torch.float32)
    slot_np = _NO_INTS if slot is None else slot.to(torch.int64).contiguous().numpy()
    cut_np = _NO_FLOATS if cut is None else _np32(cut)
    _steer_kernel(x32.detach().numpy(), out32.detach().numpy(), slot_np, slot is not None, _np32(const),
                  _np32(enc_cols), _np32(enc_bias), _np32(thresholds), _np32(coef), _np32(dec_rows),
                  cut_np, cut is not None)
    if not direct:
        out.copy_(out32)
    return out
