"""Greedy text generation with transformers (the fallback path; vLLM serves at scale)."""

from __future__ import annotations

import torch

from yapo_fast.chat import format_prompt


@torch.no_grad()
def generate_text(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int = 48, system: str | None = None
) -> list[str]:
    texts = [format_prompt(tokenizer, p, system) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only: pad on the left so answers start together
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = side
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row[batch["input_ids"].shape[1] :], skip_special_tokens=True).strip() for row in out]
