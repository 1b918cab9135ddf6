"""CAA (contrastive activation addition): the mean over pairs of the difference between layer-L
activations on the chosen and on the rejected response. The cheapest dense baseline.

On Llama-style decoders the activations come from the lean trainer's layer runner: only layers
0..L run (nothing after L is needed), the prompt once for both responses, pairs packed into rows
without padding. Other models: a forward hook on a full forward per response."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from yapo_fast.chat import format_prompt, prompt_and_response_ids
from yapo_fast.data.pairs import PreferencePair
from yapo_fast.errors import YapoFastError
from yapo_fast.integrations.hf_hooks import capture_layer_output
from yapo_fast.model import check_layer, model_identity
from yapo_fast.vector import SteeringVector


@torch.no_grad()
def response_activation(model, tokenizer, prompt_text: str, response: str, layer: int, reduce: str) -> torch.Tensor:
    p, r = prompt_and_response_ids(tokenizer, prompt_text, response)
    ids = torch.tensor([p + r], device=model.device)
    with capture_layer_output(model, layer) as seen:
        model(ids)
    resp = seen[0][0, len(p) :].to(torch.float32)
    return resp.mean(0) if reduce == "mean" else resp[-1]


def train_caa(
    model,
    tokenizer,
    pairs: list[PreferencePair],
    layer: int,
    *,
    reduce: str = "mean",
    system: str | None = None,
    progress: bool = True,
    batch_size: int = 8,
) -> SteeringVector:
    if reduce not in ("mean", "last"):
        raise YapoFastError(f"reduce must be 'mean' or 'last', got {reduce!r}")
    if not pairs:
        raise YapoFastError("CAA needs at least one preference pair")
    check_layer(model, layer)
    try:
        from yapo_fast.train.lean import DecoderRunner

        runner = DecoderRunner(model)
    except YapoFastError:
        runner = None
    total = None
    if runner is not None:
        total = _sum_differences_lean(runner, tokenizer, pairs, layer, reduce, system, progress, batch_size)
    else:
        for pair in tqdm(pairs, desc=f"CAA layer {layer}", disable=not progress):
            prompt_text = format_prompt(tokenizer, pair.prompt, system)
            diff = response_activation(model, tokenizer, prompt_text, pair.chosen, layer, reduce) - response_activation(
                model, tokenizer, prompt_text, pair.rejected, layer, reduce
            )
            total = diff if total is None else total + diff
    return SteeringVector.from_dense(
        total / len(pairs),
        method="caa",
        layer=layer,
        model=model_identity(model),
        info={"pairs": len(pairs), "reduce": reduce},
    )


@torch.no_grad()
def _sum_differences_lean(runner, tokenizer, pairs, layer, reduce, system, progress, batch_size) -> torch.Tensor:
    from yapo_fast.train.cache import tokenize_pairs
    from yapo_fast.train.lean import gather_rows, make_layout, scatter_rows

    tokens = tokenize_pairs(tokenizer, pairs, system)
    total = torch.zeros(runner.embed.weight.shape[1], dtype=torch.float32, device=runner.device)
    for start in tqdm(range(0, len(tokens), batch_size), desc=f"CAA layer {layer}", disable=not progress):
        toks = tokens[start : start + batch_size]
        B = len(toks)
        ids_p = [torch.tensor(t.prompt) for t in toks]
        ids_r = [torch.tensor(t.chosen) for t in toks] + [torch.tensor(t.rejected) for t in toks]
        lay = make_layout([len(x) for x in ids_p], [len(x) for x in ids_r], runner.device)
        G, lp, lr = lay.n_rows, lay.pos_p.shape[1], lay.pos_r.shape[1]
        emb = lambda seqs: [runner.embed(x.to(runner.device)) for x in seqs]  # noqa: E731
        hp, kv = runner.run(
            scatter_rows(emb(ids_p), lay.p_slots, G, lp), lay.pos_p, lay.allowed_p, 0, layer + 1, record=True
        )
        hr, _ = runner.run(
            scatter_rows(emb(ids_r), lay.r_slots, G, lr), lay.pos_r, lay.allowed_r, 0, layer + 1, prefix=kv.layers
        )
        acts = [h.float().mean(0) if reduce == "mean" else h[-1].float() for h in gather_rows(hr, lay.r_slots)]
        total += torch.stack(acts[:B]).sum(0) - torch.stack(acts[B:]).sum(0)
    return total.cpu()
