"""How often a feature fires on the vector's training data, chosen vs rejected responses.

Over the response tokens of the first `limit` pairs (prompt through the chat template, response
tokenised apart, as in training), with the unsteered model at the vector's layer:

- frequency = (response tokens where z_i > 0) / (response tokens)
- mean      = sum of z_i over response tokens / (response tokens)   (zeros included)
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..chat import format_prompt, prompt_and_response_ids
from .activation_index import layer_states


@torch.no_grad()
def chosen_rejected_stats(model, tokenizer, sae, layer: int, pairs, latents: list[int], *,
                          progress: bool = True) -> dict:
    """{"chosen"|"rejected": {"tokens": n, "frequency": [..], "mean": [..]}} for `latents` (in order)."""
    idx = torch.tensor(latents, dtype=torch.int64)
    out = {}
    for side in ("chosen", "rejected"):
        fired = torch.zeros(len(latents), dtype=torch.float64)
        sums = torch.zeros(len(latents), dtype=torch.float64)
        n = 0
        for pair in tqdm(pairs, desc=f"feature stats ({side})", disable=not progress):
            p, r = prompt_and_response_ids(tokenizer, format_prompt(tokenizer, pair.prompt), getattr(pair, side))
            if not r:
                continue
            h = layer_states(model, layer, torch.tensor([p + r]))[0, len(p):]
            z = sae.encode(h.to(sae.device))[:, idx].double().cpu()
            fired += (z > 0).sum(0)
            sums += z.sum(0)
            n += z.shape[0]
        out[side] = {"tokens": n, "frequency": (fired / max(n, 1)).tolist(), "mean": (sums / max(n, 1)).tolist()}
    return out
