"""Prepare a steering vector once per (vector, SAE, multiplier) so the per-token op costs only
what it must.

Why: for one token, with a_i = m*v_i and z_i >= 0 the SAE code,

    h' = h + sum_{i in support} (ReLU(z_i + a_i) - z_i) * W_dec[i]

- a_i > 0: ReLU(z_i + a_i) - z_i = a_i, whatever h is.  Those entries fold into ONE constant
  vector ``const = sum a_i * W_dec[i]`` (d_model,), added to every token.
- a_i < 0: ReLU(z_i + a_i) - z_i = max(a_i, -z_i) = -min(z_i, |a_i|): the feature is capped at
  |a_i|.  These "dependent" entries need z_i, i.e. the encoder column i, the folded bias, the
  activation threshold and the decoder row i.  That is all the per-token work.
- a_i = 0 with m != 0 (a trained coordinate currently at zero, e.g. the trainer's zero init):
  the forward contribution is 0, but d h'/d v_i = m * 1[z_i > 0] * W_dec[i] depends on h, so the
  entry is kept in the dependent set (coefficient 0) for the gradient to be exact.

The SAE's b_dec input centering is folded into the bias: (h - b_dec) @ W_enc[:, i] + b_enc[i] =
h @ W_enc[:, i] + (b_enc[i] - b_dec @ W_enc[:, i]).

Activation rule, shared by every backend (z = pre where active, 0 elsewhere):
- relu:     active = pre > 0
- jumprelu: active = pre > max(threshold_i, 0)     (== ReLU(pre) * (pre > threshold_i) != 0)
- topk:     active = pre > 0 and pre >= cut_t, where cut_t is a per-token cut between the k-th
            and (k+1)-th largest pre-activation over ALL d_sae latents (see topk_threshold.py).
            Tie rule: every latent tied with the k-th largest value is active (pre >= kth).

Everything is stored in float32 (the reference computes in float32 too), or float64 when the SAE
is float64 (so gradcheck can run in float64).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from yapo_fast.errors import YapoFastError


@dataclass(eq=False)
class PreparedSteer:
    """One (vector, SAE, multiplier), ready for :func:`sparse_steer`. n = number of dependent entries."""

    kind: str  # SAE kind: relu | jumprelu | topk
    multiplier: float
    d_model: int
    d_sae: int
    support: torch.Tensor  # (n_support,) int64 latent ids whose values the op differentiates wrt
    values: torch.Tensor  # (n_support,) v at the support; keeps the autograd link to the latent
    const: torch.Tensor  # (d_model,) sum over a_i > 0 of a_i * W_dec[i]
    const_pos: torch.Tensor  # (n_pos,) positions within `support` of the constant entries
    const_dec_rows: torch.Tensor  # (n_pos, d_model) their decoder rows (gradient wrt v only)
    dep_pos: torch.Tensor  # (n,) positions within `support` of the dependent entries
    dep_indices: torch.Tensor  # (n,) their latent ids
    coef: torch.Tensor  # (n,) a_i = m*v_i <= 0
    enc_cols: torch.Tensor  # (d_model, n) gathered encoder columns
    enc_bias: torch.Tensor  # (n,) b_enc with the b_dec centering folded in
    thresholds: torch.Tensor  # (n,) active iff pre > threshold (max(thr, 0) for jumprelu; 0 else)
    dec_rows: torch.Tensor  # (n, d_model) gathered decoder rows
    # TopK only: what the per-token k-th largest pre-activation needs (all latents).
    topk_W_enc: torch.Tensor | None = None  # (d_model, d_sae)
    topk_b_enc: torch.Tensor | None = None  # (d_sae,) folded bias
    k: int | None = None

    @property
    def n_dependent(self) -> int:
        return int(self.coef.shape[0])

    @property
    def device(self) -> torch.device:
        return self.const.device

    def to(self, device) -> "PreparedSteer":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return PreparedSteer(**moved)


def _as_float32_sae_tensors(sae):
    dtype = torch.float64 if sae.W_enc.dtype == torch.float64 else torch.float32

    def f32(t):
        return None if t is None else t.detach().to(dtype)

    return f32(sae.W_enc), f32(sae.b_enc), f32(sae.W_dec), f32(sae.b_dec), f32(sae.threshold)


def prepare_sparse_steer(
    sae, latent: torch.Tensor, multiplier: float, *, support: torch.Tensor | None = None
) -> PreparedSteer:
    """Split the vector into its constant part and its h-dependent part (see module docstring).

    sae: yapo_fast.SAE. latent: (d_sae,) dense vector (may require grad: the gradient flows back
    through ``values = latent[support]``). support: latent ids to differentiate wrt (default:
    the non-zeros of ``latent``; pass it explicitly when training from a zero vector).
    """
    if not isinstance(latent, torch.Tensor) or latent.shape != (sae.d_sae,):
        got = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise YapoFastError(
            f"latent vector has shape {got} but the SAE has d_sae={sae.d_sae}: "
            "pass a dense (d_sae,) vector for this SAE"
        )
    m = float(multiplier)
    device = sae.W_enc.device
    latent = latent.to(device)
    if support is None:
        support = torch.nonzero(latent.detach()).flatten()
    else:
        support = torch.as_tensor(support, device=device).to(torch.int64).flatten()
        if support.numel() and (support.min() < 0 or support.max() >= sae.d_sae):
            raise YapoFastError(f"support ids must lie in 0..{sae.d_sae - 1} (the SAE's latents)")
        if torch.unique(support).numel() != support.numel():
            raise YapoFastError("support ids must be unique: each latent once")
    values = latent[support]
    W_enc, b_enc, W_dec, b_dec, threshold = _as_float32_sae_tensors(sae)
    with torch.no_grad():
        a = m * values.detach().to(W_enc.dtype)
        dependent = (a < 0) | ((a == 0) & (m != 0))
        const_pos = torch.nonzero(~dependent).flatten()
        dep_pos = torch.nonzero(dependent).flatten()
        const_ids, dep_ids = support[const_pos], support[dep_pos]
        const_dec_rows = W_dec[const_ids].contiguous()
        const = (
            a[const_pos] @ const_dec_rows
            if const_pos.numel()
            else torch.zeros(sae.d_in, device=device, dtype=W_enc.dtype)
        )
        enc_cols = W_enc[:, dep_ids].contiguous()
        enc_bias = b_enc[dep_ids]
        if sae.apply_b_dec_to_input:
            enc_bias = enc_bias - b_dec @ enc_cols
        if sae.kind == "jumprelu":
            thresholds = threshold[dep_ids].clamp_min(0.0)
        else:
            thresholds = torch.zeros(dep_ids.numel(), device=device, dtype=W_enc.dtype)
        prepared = PreparedSteer(
            kind=sae.kind,
            multiplier=m,
            d_model=sae.d_in,
            d_sae=sae.d_sae,
            support=support,
            values=values,
            const=const.contiguous(),
            const_pos=const_pos,
            const_dec_rows=const_dec_rows,
            dep_pos=dep_pos,
            dep_indices=dep_ids,
            coef=a[dep_pos].contiguous(),
            enc_cols=enc_cols,
            enc_bias=enc_bias.contiguous(),
            thresholds=thresholds.contiguous(),
            dec_rows=W_dec[dep_ids].contiguous(),
        )
        if sae.kind == "topk":
            prepared.topk_W_enc = W_enc.contiguous()
            prepared.topk_b_enc = (b_enc - b_dec @ W_enc) if sae.apply_b_dec_to_input else b_enc.clone()
            prepared.k = int(sae.k)
    return prepared


@dataclass(eq=False)
class PreparedSlots:
    """Several prepared vectors stacked for per-request serving: token t is steered by slot
    ``slot_index[t]`` (-1: unsteered). Dependent entries are padded to the largest n with
    coefficient 0, zero columns/rows: max(0, -z) = 0, so padding adds exactly nothing."""

    kind: str
    d_model: int
    d_sae: int
    const: torch.Tensor  # (S, d_model)
    coef: torch.Tensor  # (S, n_max)
    enc_cols: torch.Tensor  # (S, d_model, n_max)
    enc_bias: torch.Tensor  # (S, n_max)
    thresholds: torch.Tensor  # (S, n_max)
    dec_rows: torch.Tensor  # (S, n_max, d_model)
    topk_W_enc: torch.Tensor | None = None
    topk_b_enc: torch.Tensor | None = None
    k: int | None = None

    @property
    def n_slots(self) -> int:
        return int(self.const.shape[0])

    @property
    def device(self) -> torch.device:
        return self.const.device


def stack_prepared(prepared: "list[PreparedSteer]") -> PreparedSlots:
    """Stack vectors prepared for the same SAE kind and d_model (TopK: the very same SAE weights,
    since one k-th-largest pass serves all slots)."""
    if not prepared:
        raise YapoFastError("stack_prepared needs at least one prepared vector")
    first = prepared[0]
    for p in prepared[1:]:
        if (p.kind, p.d_model, p.d_sae) != (first.kind, first.d_model, first.d_sae):
            raise YapoFastError(
                "all slots must use SAEs of the same kind and shape; got "
                f"{(p.kind, p.d_model, p.d_sae)} vs {(first.kind, first.d_model, first.d_sae)}"
            )
        if first.kind == "topk" and not (
            p.k == first.k
            and torch.equal(p.topk_W_enc, first.topk_W_enc)
            and torch.equal(p.topk_b_enc, first.topk_b_enc)
        ):
            raise YapoFastError("TopK slots must share one SAE (same weights and k)")
    n_max = max(p.n_dependent for p in prepared)
    S, d = len(prepared), first.d_model
    kw = dict(device=first.device, dtype=first.const.dtype)
    slots = PreparedSlots(
        kind=first.kind,
        d_model=d,
        d_sae=first.d_sae,
        const=torch.stack([p.const for p in prepared]),
        coef=torch.zeros(S, n_max, **kw),
        enc_cols=torch.zeros(S, d, n_max, **kw),
        enc_bias=torch.zeros(S, n_max, **kw),
        thresholds=torch.zeros(S, n_max, **kw),
        dec_rows=torch.zeros(S, n_max, d, **kw),
        topk_W_enc=first.topk_W_enc,
        topk_b_enc=first.topk_b_enc,
        k=first.k,
    )
    for s, p in enumerate(prepared):
        n = p.n_dependent
        slots.coef[s, :n] = p.coef
        slots.enc_cols[s, :, :n] = p.enc_cols
        slots.enc_bias[s, :n] = p.enc_bias
        slots.thresholds[s, :n] = p.thresholds
        slots.dec_rows[s, :n] = p.dec_rows
    return slots
