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

from .errors import YapoFastError

ANSWER_PREFIX = "Answer: ("  # the assistant's answer starts here; the next token is the option letter


def letter_token_ids(tokenizer, letters: str, prefix: str = ANSWER_PREFIX) -> list[int]:
    """The token id of each option letter as it follows `prefix` (one token each, or an error)."""
    base = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in letters:
        full = tokenizer(prefix + letter, add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise YapoFastError(f"the tokenizer does not write option letter {letter!r} as one token after "
                                f"{prefix!r} ({base} -> {full}); multiple-choice scoring needs single-token letters")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise YapoFastError(f"option letters {letters!r} map to repeated token ids {ids}")
    return ids


@torch.no_grad()
def next_token_logits(model, tokenizer, texts: list[str], token_ids: list[int], *, batch_size: int = 8,
                      progress: bool = False, desc: str = "scoring") -> torch.Tensor:
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
        rows = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       logits_to_keep=1).logits[:, -1]
        out[rows] = logits.float().cpu()[:, index]
    return out


def option_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Probabilities of the options normalised over the option letters only (softmax of their logits)."""
    return torch.softmax(logits.double(), dim=-1).float()
