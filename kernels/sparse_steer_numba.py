"""The fused sparse steer as a numba CPU kernel, parallel over tokens (prange).

Per token, in one pass and without any (T, d_model) or (T, d_sae) temporary:
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


TOKEN_BLOCK = 8  # tokens sharing one pass over a chunk of encoder columns (kept in cache)
COL_CHUNK = 256  # encoder columns per chunk: d_model x 256 floats ~ 0.6 MB for d_model 576


def _steer_blocks(x, out, const, enc_cols, enc_bias, thresholds, coef, dec_rows, cut, has_cut):
    """One vector (slot 0). prange over blocks of TOKEN_BLOCK tokens: each chunk of encoder
    columns is read once per block instead of once per token (it matters once n is large)."""
    T, d = x.shape
    n = coef.shape[1]
    n_blocks = (T + TOKEN_BLOCK - 1) // TOKEN_BLOCK
    for blk in prange(n_blocks):
        t0 = blk * TOKEN_BLOCK
        nt = min(T, t0 + TOKEN_BLOCK) - t0
        # Encode the whole block first: out may alias x (in place), x is read before out is written.
        c = np.zeros((nt, n), dtype=np.float32)
        pre = np.empty((nt, COL_CHUNK), dtype=np.float32)
        for j0 in range(0, n, COL_CHUNK):
            nc = min(COL_CHUNK, n - j0)
            for tt in range(nt):
                for j in range(nc):
                    pre[tt, j] = enc_bias[0, j0 + j]
            for dd in range(d):
                for tt in range(nt):
                    xv = x[t0 + tt, dd]
                    for j in range(nc):
                        pre[tt, j] += xv * enc_cols[0, dd, j0 + j]
            for tt in range(nt):
                lo = cut[t0 + tt] if has_cut else -np.inf
                for j in range(nc):
                    p = pre[tt, j]
                    if p > thresholds[0, j0 + j] and p >= lo:
                        c[tt, j0 + j] = max(coef[0, j0 + j], -p)
        for tt in range(nt):
            t = t0 + tt
            for dd in range(d):
                out[t, dd] = x[t, dd] + const[0, dd]
            for j in range(n):  # inactive latents (c == 0) skip their decoder row entirely
                cj = c[tt, j]
                if cj != 0.0:
                    for dd in range(d):
                        out[t, dd] += cj * dec_rows[0, j, dd]


def _steer_slots(x, out, slot, const, enc_cols, enc_bias, thresholds, coef, dec_rows, cut, has_cut):
    """Several vectors: token t uses slot[t] (-1: copied unchanged). Per token (the slot varies)."""
    T, d = x.shape
    n = coef.shape[1]
    for t in prange(T):
        s = slot[t]
        if s < 0:
            for j in range(d):
                out[t, j] = x[t, j]
            continue
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
                cj = max(coef[s, j], -p)
                if cj != 0.0:
                    for dd in range(d):
                        out[t, dd] += cj * dec_rows[s, j, dd]


_steer_blocks_kernel = numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)(_steer_blocks)
_steer_slots_kernel = numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)(_steer_slots)
# Threads only pay off with enough work: waking the pool costs tens of microseconds (much more on
# a busy machine). Below this many multiply-adds (T * d_model * n) the kernel runs on one thread.
# Why not a serial (parallel=False) build for small work: measured 2-4.5x SLOWER than the parallel
# build on one thread (T 1..16, n 32..512; the parfor-lowered loops vectorise better). And
# numba's on-disk cache is keyed by qualified name, not by the parallel flag, so two builds of one
# function would overwrite each other's cache entries anyway.
PARALLEL_MIN_WORK = 2_000_000


_NO_FLOATS = np.zeros(1, dtype=np.float32)


def _np32(t):
    return t.detach().to(torch.float32).contiguous().numpy()


def prepared_arrays(prepared):
    """numpy float32 views of the prepared tensors (const, enc_cols, enc_bias, thresholds, coef,
    dec_rows) with a leading slot axis, built once per prepared vector and kept on it. Why:
    converting six tensors costs ~30 us per call, six times the kernel itself at decode shapes
    (T = 1..8). The cache is checked by identity against the tensors it was built from (views
    share their memory, so in-place edits are seen; a replaced tensor rebuilds it)."""
    p = prepared
    base = (p.const, p.enc_cols, p.enc_bias, p.thresholds, p.coef, p.dec_rows)
    cached = p.__dict__.get("_numba_arrays")
    if cached is not None and all(a is b for a, b in zip(cached[0], base)):
        return cached[1]
    single = p.const.dim() == 1  # a PreparedSteer; PreparedSlots already has the slot axis
    arrays = tuple(_np32(t)[None] if single else _np32(t) for t in base)
    p.__dict__["_numba_arrays"] = (base, arrays)
    return arrays


def steer_numba_prepared(x, out, slot, prepared, cut):
    """The dispatch point's entry: the numba kernel with the prepared vector's arrays cached."""
    return _launch(x, out, slot, prepared_arrays(prepared), cut)


def _launch(x, out, slot, arrays, cut):
    if x.device.type != "cpu":
        raise ValueError("the numba kernel runs on CPU tensors")
    direct = out.dtype == torch.float32 and out.is_contiguous()
    x32 = x.contiguous() if x.dtype == torch.float32 else x.to(torch.float32)
    out32 = out if direct else torch.empty(out.shape, dtype=torch.float32)
    x_np = (x32.detach() if x32.requires_grad else x32).numpy()
    out_np = (out32.detach() if out32.requires_grad else out32).numpy()
    cut_np = _NO_FLOATS if cut is None else _np32(cut)
    parallel = x.shape[0] > TOKEN_BLOCK and x.shape[0] * x.shape[1] * max(arrays[4].shape[1], 1) >= PARALLEL_MIN_WORK
    threads = 1 if parallel else numba.get_num_threads()  # (~2 us each: only when it matters)
    if threads != 1:
        numba.set_num_threads(1)
    try:
        if slot is None:
            _steer_blocks_kernel(x_np, out_np, *arrays, cut_np, cut is not None)
        else:
            _steer_slots_kernel(
                x_np, out_np, slot.to(torch.int64).contiguous().numpy(), *arrays, cut_np, cut is not None
            )
    finally:
        if threads != 1:
            numba.set_num_threads(threads)
    if not direct:
        out.copy_(out32)
    return out
