"""Logit lens of an SAE feature: its decoder direction W_dec[i] read out as if it were the final
residual stream, through the model's final norm and unembedding. The top tokens are those the
feature promotes, the bottom ones those it suppresses (direct effect only: later layers ignored)."""

from __future__ import annotations

import torch

from yapo_fast.errors import YapoFastError
from yapo_fast.model import find_submodule


def final_norm(model):
    """The norm applied before the unembedding (Llama/Gemma/Mistral/Qwen: model.model.norm)."""
    norm = find_submodule(
        model,
        (
            "model.norm",
            "model.model.norm",
            "transformer.ln_f",
            "gpt_neox.final_layer_norm",
            "model.decoder.final_layer_norm",
        ),
    )
    if norm is None:
        raise YapoFastError(f"cannot find the final norm of {type(model).__name__} for the logit lens")
    return norm


@torch.no_grad()
def logit_lens(model, directions: torch.Tensor, k: int = 10) -> list[dict]:
    """For each row of `directions` (n, d_model): the k top and k bottom token ids and their logits."""
    norm, unembed = final_norm(model), model.get_output_embeddings()
    if unembed is None:
        raise YapoFastError(f"{type(model).__name__} has no output embedding to read the logit lens through")
    param = next(unembed.parameters())
    logits = unembed(norm(directions.to(param.device, param.dtype))).float().cpu()  # (n, vocab)
    k = min(k, logits.shape[1])
    top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
    return [
        {
            "top": list(zip(top.indices[r].tolist(), top.values[r].tolist())),
            "bottom": list(zip(bottom.indices[r].tolist(), bottom.values[r].tolist())),
        }
        for r in range(logits.shape[0])
    ]
