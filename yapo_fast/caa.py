"""CAA (contrastive activation addition): the mean over pairs of the difference between layer-L
activations on the chosen and on the rejected response. The cheapest dense baseline."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .chat import format_prompt, prompt_and_response_ids
from .data import PreferencePair
from .errors import YapoFastError
from .integrations.hf_hooks import capture_layer_output
from .model import check_layer, model_identity
from .vector import SteeringVector


@torch.no_grad()
def response_activation(model, tokenizer, prompt_text: str, response: str, layer: int, reduce: str) -> torch.Tensor:
    p, r = prompt_and_response_ids(tokenizer, prompt_text, response)
    ids = torch.tensor([p + r], device=model.device)
    with capture_layer_output(model, layer) as seen:
        model(ids)
    resp = seen[0][0, len(p):].to(torch.float32)
    return resp.mean(0) if reduce == "mean" else resp[-1]


def train_caa(model, tokenizer, pairs: list[PreferencePair], layer: int, *, reduce: str = "mean",
              system: str | None = None, progress: bool = True) -> SteeringVector:
    if reduce not in ("mean", "last"):
        raise YapoFastError(f"reduce must be 'mean' or 'last', got {reduce!r}")
    if not pairs:
        raise YapoFastError("CAA needs at least one preference pair")
    check_layer(model, layer)
    total = None
    for pair in tqdm(pairs, desc=f"CAA layer {layer}", disable=not progress):
        prompt_text = format_prompt(tokenizer, pair.prompt, system)
        diff = (response_activation(model, tokenizer, prompt_text, pair.chosen, layer, reduce)
                - response_activation(model, tokenizer, prompt_text, pair.rejected, layer, reduce))
        total = diff if total is None else total + diff
    return SteeringVector.from_dense(total / len(pairs), method="caa", layer=layer, model=model_identity(model),
                                     info={"pairs": len(pairs), "reduce": reduce})
