"""Prompts through the model's chat template, as in training and evaluation."""

from __future__ import annotations


def format_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """The chat-templated prompt text, ending where the assistant's answer begins."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (f"{system}\n\n" if system else "") + f"User: {prompt}\nAssistant:"


def prompt_and_response_ids(tokenizer, prompt_text: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of a templated prompt and of its response, tokenized apart so that the response
    boundary is exact (as the reference trainers do)."""
    p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    return p, r
