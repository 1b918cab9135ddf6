"""Scoring primitive shared by every evaluation: the next-token logits of a batch of prompts,
restricted to a few answer tokens (option letters), through transformers.

Prompts are left-padded into batches (sorted by length so little padding is computed) with
explicit position ids, so a padded row gives the same logits as the prompt alone; only the last
position goes through the LM head (logits_to_keep=1). Steering, if any, is whatever hook the
caller installed (yapo_fast.steer) around the call.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from yapo_fast.errors import YapoFastError

ANSWER_PREFIX = "Answer: ("  # the assistant's answer starts here; the next token is the option letter


def letter_token_ids(tokenizer, letters: str, prefix: str = ANSWER_PREFIX) -> list[int]:
    """The token id of each option letter as it follows `prefix` (one token each, or an error)."""
    base = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in letters:
        full = tokenizer(prefix + letter, add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise YapoFastError(
                f"the tokenizer does not write option letter {letter!r} as one token after "
                f"{prefix!r} ({base} -> {full}); multiple-choice scoring needs single-token letters"
            )
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise YapoFastError(f"option letters {letters!r} map to repeated token ids {ids}")
    return ids


@torch.no_grad()
def next_token_logits(
    model,
    tokenizer,
    texts: list[str],
    token_ids: list[int],
    *,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "scoring",
) -> torch.Tensor:
    """(len(texts), len(token_ids)) float32 logits of `token_ids` at the position after each text."""
    if not texts:
        return torch.zeros(0, len(token_ids))
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if any(len(e) == 0 for e in encoded):
        raise YapoFastError("an evaluation prompt tokenized to nothing")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = torch.empty(len(texts), len(token_ids))
    index = torch.tensor(token_ids)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        rows = order[start : start + batch_size]
        ids, mask, positions = _padded_batch(encoded, rows, pad)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=1,
        ).logits[:, -1]
        out[rows] = logits.float().cpu()[:, index]
    return out


def option_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Probabilities of the options normalised over the option letters only (softmax of their logits)."""
    return torch.softmax(logits.double(), dim=-1).float()


def _padded_batch(encoded: list[list[int]], rows: list[int], pad: int):
    """Left-padded ids, attention mask and position ids for the given rows."""
    width = max(len(encoded[i]) for i in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
        mask[r, width - len(encoded[i]) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def steered_next_token_logits(
    model,
    tokenizer,
    texts: list[str],
    token_ids: list[int],
    layer: int,
    steerings: dict,
    *,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "scoring",
) -> dict:
    """next_token_logits under several steerings of one layer at once: {key: logits}.

    steerings: {key: steer_fn or None}, steer_fn(h) -> h' applied to decoder layer `layer`'s output
    (yapo_fast.steering.make_steer_fn; None: unsteered). Layers 0..layer run once per batch and
    only layers layer+1.. run once per steering (the steering changes nothing below it), so a
    steering curve of k multipliers costs about 1 + k*(N-layer-1)/N forwards instead of k+1.
    Llama-style decoders only (train.lean.DecoderRunner; it raises YapoFastError otherwise: use
    next_token_logits under a hook). Equal to the hooked full forward (tests/test_eval_scorers.py).
    """
    from yapo_fast.train.lean import DecoderRunner

    runner = DecoderRunner(model)
    if not 0 <= layer < runner.n_layers:
        raise YapoFastError(f"layer {layer} is outside the model's {runner.n_layers} decoder layers")
    out = {key: torch.empty(len(texts), len(token_ids)) for key in steerings}
    if not texts:
        return out
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if any(len(e) == 0 for e in encoded):
        raise YapoFastError("an evaluation prompt tokenized to nothing")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    index = torch.tensor(token_ids)
    device = runner.device
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        rows = order[start : start + batch_size]
        ids, mask, positions = (t.to(device) for t in _padded_batch(encoded, rows, pad))
        width = ids.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        allowed = causal[None] & mask.bool()[:, None, :]
        h_layer, _ = runner.run(runner.embed(ids), positions, allowed, 0, layer + 1)
        for key, fn in steerings.items():
            h = h_layer if fn is None else fn(h_layer)
            h, _ = runner.run(h, positions, allowed, layer + 1, runner.n_layers)
            logits = runner.lm_head(runner.norm(h[:, -1])).float().cpu()
            out[key][rows] = logits[:, index]
    return out
