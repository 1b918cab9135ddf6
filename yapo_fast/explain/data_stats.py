"""How often a feature fires on the vector's training data, chosen vs rejected responses.

Over the response tokens of the first `limit` pairs (prompt through the chat template, response
tokenised apart, as in training), with the unsteered model at the vector's layer:

- frequency = (response tokens where z_i > 0) / (response tokens)
- mean      = sum of z_i over response tokens / (response tokens)   (zeros included)
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from yapo_fast.chat import format_prompt, prompt_and_response_ids
from yapo_fast.explain.activation_index import layer_states


@torch.no_grad()
def chosen_rejected_stats(
    model, tokenizer, sae, layer: int, pairs, latents: list[int] | None, *, batch_size: int = 8, progress: bool = True
) -> dict:
    """{"chosen"|"rejected": {"tokens": n, "frequency": [..], "mean": [..]}} for `latents` (in order;
    None: every latent).

    Sequences go through the model in right-padded batches: with causal attention the padding
    cannot change a real token's state, so the numbers equal those of one sequence at a time."""
    idx = torch.arange(sae.d_sae) if latents is None else torch.tensor(latents, dtype=torch.int64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {}
    for side in ("chosen", "rejected"):
        fired = torch.zeros(len(idx), dtype=torch.float64)
        sums = torch.zeros(len(idx), dtype=torch.float64)
        n = 0
        seqs = [
            prompt_and_response_ids(tokenizer, format_prompt(tokenizer, pair.prompt), getattr(pair, side))
            for pair in pairs
        ]
        seqs = [(p, r) for p, r in seqs if r]
        for s in tqdm(range(0, len(seqs), batch_size), desc=f"feature stats ({side})", disable=not progress):
            batch = seqs[s : s + batch_size]
            width = max(len(p) + len(r) for p, r in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.int64)
            mask = torch.zeros((len(batch), width), dtype=torch.bool)
            resp = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, (p, r) in enumerate(batch):
                ids[row, : len(p) + len(r)] = torch.tensor(p + r)
                mask[row, : len(p) + len(r)] = True
                resp[row, len(p) : len(p) + len(r)] = True
            h = layer_states(model, layer, ids, mask)
            z = sae.encode(h[resp.to(h.device)].to(sae.device))[:, idx.to(sae.device)].double().cpu()
            fired += (z > 0).sum(0)
            sums += z.sum(0)
            n += z.shape[0]
        out[side] = {"tokens": n, "frequency": (fired / max(n, 1)).tolist(), "mean": (sums / max(n, 1)).tolist()}
    return out
