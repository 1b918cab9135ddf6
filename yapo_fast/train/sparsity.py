"""Learned sparsity for YaPO vectors: a step applied to v after every optimizer step.

AdamW gives every latent that fires on some training token a non-zero entry, so an unconstrained
YaPO vector ends up nearly dense (4498 of 4608 entries in the main job). Two exact projections:

- support budget k (`support=`): keep the k_t entries of largest effect |v_i| * ||W_dec[i]|| and set
  the rest to zero, their AdamW moments with them (a zeroed entry restarts from scratch if it
  re-enters the support, instead of jumping back on stale momentum). k_t falls from d_sae to k over
  the first half of the steps on the cubic schedule of gradual magnitude pruning (Zhu & Gupta 2017,
  "To prune, or not to prune"): AdamW moves every entry by about lr per step whatever its gradient,
  so after one step all magnitudes tie and a fixed top-k would pick its support by index order;
  ties are broken by the second moment (the larger gradient), then by index;
- L1 strength lambda (`l1=`): the proximal step of lambda * ||v||_1 at the current learning rate,
  v_i <- sign(v_i) * max(|v_i| - lr * lambda, 0) (soft threshold).

Both are pure functions of (v, optimizer state), so a resumed run continues bit for bit.
Post-hoc pruning of a trained vector by the same effect score is `prune_by_effect`.
"""

from __future__ import annotations

import torch

from yapo_fast.errors import YapoFastError


def check_sparsity(method: str, support: int | None, l1: float, d_sae: int | None) -> None:
    if support is None and not l1:
        return
    if method != "yapo":
        raise YapoFastError(f"support / l1 make sense for yapo vectors (SAE latents), not {method!r}")
    if support is not None and (not isinstance(support, int) or isinstance(support, bool) or support < 1):
        raise YapoFastError(f"support must be a positive integer (entries of v kept), got {support!r}")
    if d_sae is not None and support is not None and support > d_sae:
        raise YapoFastError(f"support {support} exceeds the SAE's {d_sae} latents")
    if not (isinstance(l1, (int, float)) and l1 >= 0 and l1 == l1 and l1 != float("inf")):
        raise YapoFastError(f"l1 must be a non-negative finite number, got {l1!r}")


def effect_scores(v: torch.Tensor, row_norms: torch.Tensor | None) -> torch.Tensor:
    """|v_i| * ||W_dec[i]|| (|v_i| when the decoder rows have unit norm or are not given)."""
    return v.abs() if row_norms is None else v.abs() * row_norms


def support_at(step: int, total: int, support: int, d: int) -> int:
    """k_t of the cubic gradual-pruning schedule: d at step 0, `support` from half the steps on."""
    ramp = max(1, total // 2)
    frac = min(1.0, step / ramp)
    return int(round(support + (d - support) * (1.0 - frac) ** 3))


def topk_mask(scores: torch.Tensor, k: int, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the k largest scores (ties: the larger tiebreak, then the lower index)."""
    if k >= scores.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    if tiebreak is not None:  # secondary key first: a stable sort keeps its order among equal scores
        second = torch.argsort(tiebreak, descending=True, stable=True)
        order = second[torch.argsort(scores[second], descending=True, stable=True)]
    else:
        order = torch.argsort(scores, descending=True, stable=True)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[order[:k]] = True
    return mask


@torch.no_grad()
def sparsify_step_(
    v: torch.Tensor, optimizer, *, support: int | None, l1: float, lr: float, row_norms: torch.Tensor | None = None
) -> None:
    """In place, after optimizer.step(): soft threshold (l1), then the top-k projection onto
    `support` entries (the caller passes this step's k_t); the AdamW moments of every entry set to
    zero are zeroed too."""
    state = optimizer.state.get(v, {})
    if l1:
        v.copy_(torch.sign(v) * torch.clamp(v.abs() - lr * l1, min=0))
    if support is not None:
        v.mul_(topk_mask(effect_scores(v, row_norms), support, state.get("exp_avg_sq")))
    zero = v == 0
    for name in ("exp_avg", "exp_avg_sq"):
        if name in state:
            state[name].masked_fill_(zero, 0.0)


def prune_by_effect(vector, k: int, sae=None):
    """A copy of a trained yapo vector keeping its k entries of largest effect |v_i| * ||W_dec[i]||
    (|v_i| without the SAE)."""
    import dataclasses

    if not vector.is_sparse:
        raise YapoFastError("prune_by_effect prunes yapo vectors (SAE latents); this one is dense")
    norms = None if sae is None else sae.W_dec.norm(dim=1).to(torch.float32)[vector.indices]
    keep = torch.sort(torch.nonzero(topk_mask(effect_scores(vector.values.float(), norms), k)).reshape(-1)).values
    return dataclasses.replace(
        vector,
        values=vector.values[keep].clone(),
        indices=vector.indices[keep].clone(),
        info={**vector.info, "pruned_to": k},
    )
