"""The fused sparse steer as ONE Triton kernel launch (CUDA; on the CPU under TRITON_INTERPRET=1
for tests). Nothing but h' is written: no (T, n) coefficient buffer, no (T, d_sae) anything.

Per token t (row) and dependent entry j of its slot s (see sparse_steer_prepare.py):
    pre_tj = x_t . enc_cols[s][:, j] + enc_bias[s][j]           (gathered encoder columns only)
    c_tj   = max(a_j, -pre_tj) if active_tj else 0                (activation + coefficient)
    out_t  = x_t + const[s] + sum_j c_tj * dec_rows[s][j]         (decode + residual add)
active: pre > threshold (relu: 0; jumprelu: max(thr, 0)), and for TopK also pre >= cut_t, the
per-token cut from the fused top-k threshold kernel (topk_threshold_triton.py).

Two variants of the same pass (one launch each; the launcher picks, `variant=` forces):
- "rows":  a program owns BLOCK_T tokens and ALL of d_model. Phase 1 encodes the whole support
           (padded to N_PAD <= ROWS_MAX_N) into coefficients held in registers; phase 2 walks
           d_model in tiles: out = x + const + c @ dec_rows. Each encode is computed once, and
           every read of a row happens before the row is written, so it is safe IN PLACE.
- "tiles": a program owns a (BLOCK_T tokens x BLOCK_D columns) tile of the output and loops over
           the support in blocks of BLOCK_N, accumulating the decode in registers. Any support
           size and d_model-way parallelism (decode: T = 1..8 still fills the GPU), at the price
           of re-encoding a token tile once per d_model tile. Its encode reads whole rows that
           other programs write, so IN PLACE it writes a new tensor and copies (the only case
           that is not a single pass: in place with a support larger than ROWS_MAX_N).
Multi-slot batches (serving): every row carries its slot (-1: unsteered, copied exactly); a
program loops over the slots present in its rows (skipping absent ones); const is gathered per row.
tl.dot runs with input_precision="ieee": TF32 would break exactness against the reference.

Same signature as sparse_steer_torch.steer_torch (plus variant=).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def encode_block(
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
    HAS_CUT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(pre, active) of rows x support entries nn of slot s; rows not `mine` and padded entries
    are inactive. Shared by the forward and backward kernels."""
    n_ok = nn < N
    pre = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < D
        xt = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :], mask=mine[:, None] & k_ok[None, :], other=0.0)
        et = tl.load(enc_ptr + s * D * N + kk[:, None] * N + nn[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        pre = tl.dot(xt.to(tl.float32), et, pre, input_precision="ieee")
    pre += tl.load(bias_ptr + s * N + nn, mask=n_ok, other=0.0)[None, :]
    active = pre > tl.load(thr_ptr + s * N + nn, mask=n_ok, other=0.0)[None, :]
    if HAS_CUT:
        active = active & (pre >= cut[:, None])
    return pre, active & mine[:, None] & n_ok[None, :]


@triton.jit
def coef_block(
    x_ptr,
    stride_x,
    rows,
    mine,
    enc_ptr,
    bias_ptr,
    thr_ptr,
    a_ptr,
    cut,
    s,
    D,
    N,
    nn,
    HAS_CUT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """c = max(a, -pre) on active latents, 0 elsewhere (z = 0 there and a <= 0, so max(a, -0) = 0)."""
    pre, active = encode_block(
        x_ptr, stride_x, rows, mine, enc_ptr, bias_ptr, thr_ptr, cut, s, D, N, nn, HAS_CUT, BLOCK_T, BLOCK_N, BLOCK_K
    )
    a = tl.load(a_ptr + s * N + nn, mask=nn < N, other=0.0)[None, :]
    return tl.where(active, tl.maximum(a, -pre), 0.0)


@triton.jit
def row_slots(slot_ptr, cut_ptr, rows, row_ok, HAS_SLOT: tl.constexpr, HAS_CUT: tl.constexpr):
    """Each row's slot (-1 beyond T or unsteered) and TopK cut (0 when unused)."""
    if HAS_SLOT:
        slot = tl.load(slot_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    else:
        slot = tl.where(row_ok, 0, -1)
    if HAS_CUT:
        cut = tl.load(cut_ptr + rows, mask=row_ok, other=0.0)
    else:
        cut = tl.zeros(rows.shape, dtype=tl.float32)
    return slot, cut


@triton.jit
def _steer_rows_kernel(
    x_ptr,
    out_ptr,
    slot_ptr,
    const_ptr,
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
    stride_o,
    HAS_SLOT: tl.constexpr,
    HAS_CUT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    slot, cut = row_slots(slot_ptr, cut_ptr, rows, row_ok, HAS_SLOT, HAS_CUT)
    nn = tl.arange(0, N_PAD)
    # Phase 1: each row's coefficients for its own slot's entries, before anything is written.
    c = tl.zeros((BLOCK_T, N_PAD), dtype=tl.float32)
    for s in range(0, S):
        mine = slot == s
        if tl.sum(mine.to(tl.int32), axis=0) > 0:
            c += coef_block(
                x_ptr,
                stride_x,
                rows,
                mine,
                enc_ptr,
                bias_ptr,
                thr_ptr,
                a_ptr,
                cut,
                s,
                D,
                N,
                nn,
                HAS_CUT,
                BLOCK_T,
                N_PAD,
                BLOCK_K,
            )
    # Phase 2: out = x + const[slot] + c @ dec_rows[slot], one d_model tile at a time.
    steered = slot >= 0
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        acc = tl.load(
            x_ptr + rows[:, None] * stride_x + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.load(const_ptr + slot[:, None] * D + dd[None, :], mask=steered[:, None] & d_ok[None, :], other=0.0)
        for s in range(0, S):
            mine = slot == s
            if tl.sum(mine.to(tl.int32), axis=0) > 0:
                w = tl.load(
                    dec_ptr + s * N * D + nn[:, None] * D + dd[None, :],
                    mask=(nn < N)[:, None] & d_ok[None, :],
                    other=0.0,
                )
                acc = tl.dot(tl.where(mine[:, None], c, 0.0), w, acc, input_precision="ieee")
        tl.store(
            out_ptr + rows[:, None] * stride_o + dd[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


@triton.jit
def _steer_tiles_kernel(
    x_ptr,
    out_ptr,
    slot_ptr,
    const_ptr,
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
    stride_o,
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
    acc = tl.load(x_ptr + rows[:, None] * stride_x + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(
        tl.float32
    )
    acc += tl.load(const_ptr + slot[:, None] * D + dd[None, :], mask=(slot >= 0)[:, None] & d_ok[None, :], other=0.0)
    for s in range(0, S):
        mine = slot == s
        if tl.sum(mine.to(tl.int32), axis=0) > 0:
            for n0 in range(0, N, BLOCK_N):
                nn = n0 + tl.arange(0, BLOCK_N)
                c = coef_block(
                    x_ptr,
                    stride_x,
                    rows,
                    mine,
                    enc_ptr,
                    bias_ptr,
                    thr_ptr,
                    a_ptr,
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
                w = tl.load(
                    dec_ptr + s * N * D + nn[:, None] * D + dd[None, :],
                    mask=(nn < N)[:, None] & d_ok[None, :],
                    other=0.0,
                )
                acc = tl.dot(c, w, acc, input_precision="ieee")
    tl.store(
        out_ptr + rows[:, None] * stride_o + dd[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


BLOCK_T, BLOCK_N, BLOCK_K = 16, 32, 64  # tl.dot needs >= 16 on every side
ROWS_BLOCK_D, TILES_BLOCK_D = 64, 64
ROWS_MAX_N = 128  # "rows" holds BLOCK_T x N_PAD coefficients in registers: 16 x 128 floats at most
# Below this many tokens "tiles" (d_model-way parallelism) is the default out of place; at and
# above, "rows" (one encode per token). NOT measured yet (no GPU lent so far): the GPU benchmark
# (bench/bench_sparse_steer.py, test_gpu_*) times both variants to set it.
ROWS_MIN_T = 256


def pad_support(enc_cols, enc_bias, thresholds, coef, dec_rows):
    """float32 contiguous; an empty support becomes one zero entry (inactive: pre 0 is not > 0),
    so kernels never index zero-size tensors."""
    tensors = [t.to(torch.float32).contiguous() for t in (enc_cols, enc_bias, thresholds, coef, dec_rows)]
    if coef.shape[-1] == 0:
        S, D = enc_cols.shape[0], enc_cols.shape[1]
        z = dict(dtype=torch.float32, device=coef.device)
        tensors = [
            torch.zeros(S, D, 1, **z),
            torch.zeros(S, 1, **z),
            torch.zeros(S, 1, **z),
            torch.zeros(S, 1, **z),
            torch.zeros(S, 1, D, **z),
        ]
    return tensors


def pick_variant(T, N, in_place):
    n_pad = max(16, triton.next_power_of_2(max(N, 1)))
    if n_pad <= ROWS_MAX_N and (in_place or T >= ROWS_MIN_T):
        return "rows"
    return "tiles"


def steer_triton(x, out, slot, const, enc_cols, enc_bias, thresholds, coef, dec_rows, cut, variant=None):
    T, D = x.shape
    if T == 0:
        return out
    enc_cols, enc_bias, thresholds, coef, dec_rows = pad_support(enc_cols, enc_bias, thresholds, coef, dec_rows)
    const = const.to(torch.float32).contiguous()
    S, N = coef.shape
    in_place = out.data_ptr() == x.data_ptr()
    variant = variant or pick_variant(T, N, in_place)
    n_pad = max(16, triton.next_power_of_2(N))
    if variant == "rows" and n_pad > ROWS_MAX_N:
        raise ValueError(f"variant 'rows' holds at most {ROWS_MAX_N} dependent entries in registers (got {N})")
    has_slot, has_cut = slot is not None, cut is not None
    slot_arg = slot.to(torch.int32).contiguous() if has_slot else const  # dummy pointer when unused
    cut_arg = cut.to(torch.float32).contiguous() if has_cut else const
    args = (slot_arg, const, enc_cols, enc_bias, thresholds, coef, dec_rows, cut_arg, T, D, N, S)
    if variant == "rows":
        _steer_rows_kernel[(triton.cdiv(T, BLOCK_T),)](
            x,
            out,
            *args,
            x.stride(0),
            out.stride(0),
            HAS_SLOT=has_slot,
            HAS_CUT=has_cut,
            BLOCK_T=BLOCK_T,
            N_PAD=n_pad,
            BLOCK_K=BLOCK_K,
            BLOCK_D=ROWS_BLOCK_D,
        )
        return out
    target = out
    if in_place and triton.cdiv(D, TILES_BLOCK_D) > 1:  # see the module docstring: not in place
        target = torch.empty_like(out)
    _steer_tiles_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(D, TILES_BLOCK_D))](
        x,
        target,
        *args,
        x.stride(0),
        target.stride(0),
        HAS_SLOT=has_slot,
        HAS_CUT=has_cut,
        BLOCK_T=BLOCK_T,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        BLOCK_D=TILES_BLOCK_D,
    )
    if target is not out:
        out.copy_(target)
    return out
