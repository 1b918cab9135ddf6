"""THE dispatch point of the fused sparse steer (YaPO's op, exact).

    sparse_steer(h, prepared, *, slot_index=None, out=None, inplace=False, backend=None) -> h'

- h: (..., d_model), float32 / bfloat16 / float16 (float64 runs the torch path in float64).
- prepared: a PreparedSteer (one vector; prepare_sparse_steer(sae, latent, m)) or a
  PreparedSlots (several vectors; stack_prepared([...])), see sparse_steer_prepare.py.
- slot_index: (...) int tensor with h's leading shape, required with PreparedSlots: the slot
  that steers each token, -1 = unsteered (the token is copied unchanged).
- out: write h' into this tensor (same shape and dtype as h). inplace=True writes into h.
- backend: "triton" | "numba" | "torch" | "reference"; default: YAPO_FAST_KERNEL if set, else the
  fastest measured path for the device (sparse_steer_backend.py).

Result: h' = h + const + sum over dependent entries i of max(a_i, -z_i) * W_dec[i], equal to
kernels/sparse_steer_reference.py up to float32 rounding (computed in float32, cast to h.dtype).

Autograd (single vector only): when h or prepared.values requires grad, the call goes through
SparseSteerFunction, giving d/dh and d/d values (the vector's entries at prepared.support; the
gradient reaches the dense latent through prepare's ``latent[support]``). The backward runs on the
forward's backend family: Triton kernels (sparse_steer_triton_backward.py) after a Triton
forward, else plain torch on the gathered tensors (the same unavoidable work as the forward: two
small matmuls; numba has no backward kernel because torch's MKL matmuls already beat it on CPU).
A PreparedSteer is a snapshot of v: after an optimizer step, prepare again (it only gathers
columns/rows of the support; pass support=... so a coordinate crossing zero stays in it).
"""

from __future__ import annotations

import torch

from yapo_fast.errors import YapoFastError
from yapo_fast.kernels.sparse_steer_backend import pick_backend
from yapo_fast.kernels.sparse_steer_prepare import PreparedSlots, PreparedSteer, prepare_sparse_steer, stack_prepared  # noqa: F401
from yapo_fast.kernels.sparse_steer_reference import sparse_steer_reference  # noqa: F401 (the one reference)
from yapo_fast.kernels.sparse_steer_torch import steer_one, steer_torch
from yapo_fast.kernels.topk_threshold import topk_threshold
from yapo_fast.kernels.topk_threshold_reference import topk_cut


def _per_slot(prepared):
    """(const, enc_cols, enc_bias, thresholds, coef, dec_rows) with a leading slot dimension."""
    p = prepared
    if isinstance(p, PreparedSlots):
        return p.const, p.enc_cols, p.enc_bias, p.thresholds, p.coef, p.dec_rows
    return (p.const[None], p.enc_cols[None], p.enc_bias[None], p.thresholds[None], p.coef[None], p.dec_rows[None])


def _topk_cut(x2d, prepared, requested):
    """The per-token TopK cut. `requested` is the caller's backend= (None: the threshold op picks
    its own measured default, e.g. torch on CPU even when the steer itself runs on numba)."""
    if prepared.kind != "topk" or prepared.coef.shape[-1] == 0:
        return None
    tk_backend = "torch" if requested == "reference" else requested
    kth, nxt = topk_threshold(x2d, prepared.topk_W_enc, prepared.topk_b_enc, prepared.k, backend=tk_backend)
    return topk_cut(kth, nxt).to(prepared.const.dtype)


_NUMBA_MODULE = []


def _numba_module():
    """sparse_steer_numba, imported on first use (importing numba costs ~0.5 s; an import
    statement per call costs ~1 us, which shows at decode shapes)."""
    if not _NUMBA_MODULE:
        from yapo_fast.kernels import sparse_steer_numba

        _NUMBA_MODULE.append(sparse_steer_numba)
    return _NUMBA_MODULE[0]


def _run(backend, x2d, out2d, slot, prepared, cut):
    if backend == "torch" and slot is None:  # the CPU default: skip the slot views (per-call overhead)
        p = prepared
        return steer_one(
            x2d.to(p.const.dtype), out2d, p.const, p.enc_cols, p.enc_bias, p.thresholds, p.coef, p.dec_rows, cut
        )
    if backend == "numba":  # numpy views of the prepared tensors are cached on `prepared`
        return _numba_module().steer_numba_prepared(x2d, out2d, slot, prepared, cut)
    tensors = _per_slot(prepared)
    if backend == "triton":
        from yapo_fast.kernels.sparse_steer_triton import steer_triton

        return steer_triton(x2d, out2d, slot, *tensors, cut)
    return steer_torch(x2d, out2d, slot, *tensors, cut)


def _check(h, prepared, slot_index, out, inplace):
    if not isinstance(prepared, (PreparedSteer, PreparedSlots)):
        raise YapoFastError(
            "sparse_steer needs a PreparedSteer (prepare_sparse_steer(sae, latent, m)) or "
            f"PreparedSlots (stack_prepared([...])), got {type(prepared).__name__}"
        )
    if h.shape[-1] != prepared.d_model:
        raise YapoFastError(
            f"hidden states have size {h.shape[-1]} but the SAE expects d_model={prepared.d_model}: "
            "use a vector and SAE trained for this model"
        )
    if h.device != prepared.device:
        raise YapoFastError(
            f"hidden states are on {h.device} but the prepared vector is on {prepared.device}: "
            "prepare it on the same device (or call prepared.to(device))"
        )
    if isinstance(prepared, PreparedSlots):
        if slot_index is None:
            raise YapoFastError("a PreparedSlots batch needs slot_index: one slot per token (-1 = unsteered)")
        if tuple(slot_index.shape) != tuple(h.shape[:-1]):
            raise YapoFastError(
                f"slot_index has shape {tuple(slot_index.shape)}, expected h's leading shape {tuple(h.shape[:-1])}"
            )
        if slot_index.numel() and (int(slot_index.min()) < -1 or int(slot_index.max()) >= prepared.n_slots):
            raise YapoFastError(f"slot_index values must lie in -1..{prepared.n_slots - 1}")
    elif slot_index is not None:
        raise YapoFastError("slot_index is for PreparedSlots; a single PreparedSteer steers every token")
    if out is not None and (out.shape != h.shape or out.dtype != h.dtype or out.device != h.device):
        raise YapoFastError(
            f"out must match h (shape {tuple(h.shape)}, {h.dtype}, {h.device}), got "
            f"{tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    if inplace and out is not None:
        raise YapoFastError("pass either out=... or inplace=True, not both")


def sparse_steer(
    h: torch.Tensor,
    prepared,
    *,
    slot_index: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    inplace: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    _check(h, prepared, slot_index, out, inplace)
    requested = backend
    backend = pick_backend(
        h.device,
        prepared.const.dtype if h.dtype != torch.float64 else torch.float64,
        op="sparse_steer",
        shape=(h.numel() // max(h.shape[-1], 1), prepared.d_model, prepared.coef.shape[-1]),
        forced=backend,
    )
    needs_grad = torch.is_grad_enabled() and (
        h.requires_grad or (isinstance(prepared, PreparedSteer) and prepared.values.requires_grad)
    )
    if needs_grad:
        if isinstance(prepared, PreparedSlots):
            raise YapoFastError("gradients are supported for a single PreparedSteer, not a PreparedSlots batch")
        if inplace or out is not None:
            raise YapoFastError("in-place / out= steering is not differentiable; call without them to train")
        return SparseSteerFunction.apply(h, prepared.values, prepared, backend, requested)
    if backend == "reference":
        raise YapoFastError("backend='reference' needs the SAE itself: call sparse_steer_reference(h, sae, latent, m)")
    target = h if inplace else (out if out is not None else torch.empty_like(h))
    two_d = h.dim() == 2  # skip the reshape/view calls (~2 us each: decode shapes feel them)
    x2d = h if two_d else h.reshape(-1, h.shape[-1])
    out2d = None if not target.is_contiguous() else (target if two_d else target.view(-1, h.shape[-1]))
    if x2d.stride(-1) != 1 or (x2d.shape[0] > 1 and x2d.stride(0) != x2d.shape[1]):
        x2d = x2d.contiguous()
    slot = None if slot_index is None else slot_index.reshape(-1)
    if out2d is None:  # non-contiguous target: compute into a buffer, then copy
        buf = torch.empty_like(x2d)
        _run(backend, x2d, buf, slot, prepared, _topk_cut(x2d, prepared, requested))
        target.copy_(buf.view(h.shape))
    else:
        _run(backend, x2d, out2d, slot, prepared, _topk_cut(x2d, prepared, requested))
    return target


class SparseSteerFunction(torch.autograd.Function):
    """Forward through the chosen backend; backward in Triton after a Triton forward (see
    _backward_triton), else in torch on the gathered tensors.

    With a_i = m*v_i, z_i = pre_i on active latents (0 elsewhere), g the upstream gradient:
      d h'/d h   = g + sum_dep -1[active_i and z_i + a_i <= 0] * (g . W_dec[i]) * W_enc[:, i]
      d h'/d v_i = m * sum_t 1[z_ti + a_i > 0] * (g_t . W_dec[i])        (= m * sum_t g_t . W_dec[i] for a_i > 0)
    which is what autograd through the reference gives (torch's relu'(0) = 0 included).
    """

    @staticmethod
    def forward(ctx, h, values, prepared, backend, requested):
        x2d = h.reshape(-1, h.shape[-1]).contiguous()
        out2d = torch.empty_like(x2d)
        if backend == "reference" or x2d.dtype == torch.float64:
            backend = "torch"
        cut = _topk_cut(x2d, prepared, requested)
        _run(backend, x2d, out2d, None, prepared, cut)
        ctx.prepared, ctx.backend = prepared, backend
        ctx.save_for_backward(h, cut)
        return out2d.view(h.shape)

    @staticmethod
    def backward(ctx, grad_out):
        h, cut = ctx.saved_tensors
        p = ctx.prepared
        cdt = p.const.dtype
        x = h.reshape(-1, h.shape[-1]).to(cdt)
        g = grad_out.reshape(-1, h.shape[-1]).to(cdt)
        if ctx.backend == "triton":
            return _backward_triton(ctx, h, x, g, cut)
        pre = x @ p.enc_cols + p.enc_bias
        active = pre > p.thresholds
        if cut is not None:
            active &= pre >= cut[:, None]
        z = torch.where(active, pre, torch.zeros((), dtype=cdt, device=x.device))
        gd = g @ p.dec_rows.T  # (T, n): g_t . W_dec[i]
        passes = (z + p.coef) > 0  # relu'(z + a)
        grad_h = grad_v = None
        if ctx.needs_input_grad[0]:
            capped = (active & ~passes).to(cdt)
            grad_h = (g - (gd * capped) @ p.enc_cols.T).to(h.dtype).view(h.shape)
        if ctx.needs_input_grad[1]:
            m = p.multiplier
            grad_v = torch.zeros(p.support.shape[0], dtype=cdt, device=g.device)
            grad_v[p.dep_pos] = m * (gd * passes.to(cdt)).sum(0)
            grad_v[p.const_pos] = m * (p.const_dec_rows @ g.sum(0))
            grad_v = grad_v.to(p.values.dtype)
        return grad_h, grad_v, None, None, None


def _backward_triton(ctx, h, x, g, cut):
    """SparseSteerFunction.backward on the Triton kernels (same math as the torch backward above)."""
    from yapo_fast.kernels.sparse_steer_triton_backward import steer_backward_triton

    p = ctx.prepared
    need_h, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_h, dv = steer_backward_triton(
        x,
        g,
        None,
        p.enc_cols[None],
        p.enc_bias[None],
        p.thresholds[None],
        p.coef[None],
        p.dec_rows[None],
        cut,
        need_h=need_h,
        need_v=need_v,
    )
    if need_h:
        grad_h = grad_h.to(h.dtype).view(h.shape)
    grad_v = None
    if need_v:
        grad_v = torch.zeros(p.support.shape[0], dtype=torch.float32, device=g.device)
        grad_v[p.dep_pos] = p.multiplier * dv[0]
        # Constant entries (a > 0): dv = m * sum_t g_t . W_dec[i], independent of h; a column sum + matvec.
        grad_v[p.const_pos] = p.multiplier * (p.const_dec_rows.float() @ g.float().sum(0))
        grad_v = grad_v.to(p.values.dtype)
    return grad_h, grad_v, None, None, None
