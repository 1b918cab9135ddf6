"""Is a vector big enough to matter? Its edit of the residual stream, measured on real prompts.

A steering curve that stays flat may mean the direction is useless or only that the vector is too
small to move anything (few optimizer steps: AdamW moves each entry by at most about lr per step,
so after T steps |v_i| <= lr * T). This tells the two apart before reading the curve:

- `edit_ratio`: mean over tokens of ||h' - h|| / ||h|| at layer L with multiplier m (h' the steered
  output, through the same steer op the hooks use), for every kind of vector;
- for a YaPO vector also the scale of the SAE features it touches: its largest |m v_i|, and for the
  `top` features by |v_i| the median of |m v_i| against the median of each feature's mean activation
  z_i where active (`z_active_median`); |m v_i| far below z_i means the cap/boost is negligible,
  and `top_never_active` counts top features that never fire on these prompts (a positive v_i
  there adds a constant, a negative one does nothing).
Positions 0 (the BOS token, whose residual norm is an outlier) are left out.
"""

from __future__ import annotations

import torch

from yapo_fast.integrations.hf_hooks import capture_layer_output


@torch.no_grad()
def layer_states(model, tokenizer, texts: list[str], layer: int) -> torch.Tensor:
    """(tokens, d_model) float32 outputs of decoder layer `layer` over the texts (BOS dropped)."""
    rows = []
    device = next(model.parameters()).device
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        with capture_layer_output(model, layer) as seen:
            model(input_ids=ids, logits_to_keep=1)
        rows.append(seen[0][0, 1:].float().cpu())
    return torch.cat(rows)


def vector_scale(vector, h: torch.Tensor, *, sae=None, multiplier: float = 1.0, top: int = 20) -> dict:
    """Scale of `vector`'s edit on the layer states h (see the module doc)."""
    from yapo_fast.steering import make_steer_fn

    steer_fn = make_steer_fn(vector, multiplier, sae=sae)
    h = h.to(torch.float32)
    h_steered = steer_fn(h).float()  # the hooks steer float32 hidden states (the SAE cast to float32)
    norms = h.norm(dim=-1)
    out = {
        "multiplier": float(multiplier),
        "tokens": int(h.shape[0]),
        "resid_norm": float(norms.mean()),
        "edit_norm": float((h_steered - h).norm(dim=-1).mean()),
        "edit_ratio": float(((h_steered - h).norm(dim=-1) / norms.clamp_min(1e-6)).mean()),
        "vector_norm": float(vector.values.float().norm()),
    }
    if vector.is_sparse:
        v = vector.latent().float() * multiplier  # dense (d_sae,): .values holds the non-zeros only
        z = sae.to(dtype=torch.float32).encode(h).float()
        active = z > 0
        idx = v.abs().topk(min(top, v.numel())).indices
        z_mean = torch.where(active[:, idx], z[:, idx], torch.nan).nanmean(0)  # nan: never active
        fired = ~torch.isnan(z_mean)
        out.update(
            {
                "max_abs_mv": float(v.abs().max()),
                "top": int(idx.numel()),
                "top_abs_mv_median": float(v[idx].abs().median()),
                "z_active_median": float(z_mean[fired].median()) if fired.any() else float("nan"),
                "top_never_active": int((~fired).sum()),
                "all_z_active_median": float(z[active].median()) if active.any() else float("nan"),
            }
        )
    return out
