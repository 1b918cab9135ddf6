"""Multiple-choice accuracy (cultural BLEnD items or any {question, options, answer} set).

An item is right when its answer letter has the largest logit among the option letters at the
position after "Answer: (" (prompt through the chat template).
"""

from __future__ import annotations

import torch

from yapo_fast.chat import format_prompt
from yapo_fast.data.blend import LETTERS, MCQItem
from yapo_fast.eval.score import ANSWER_PREFIX, letter_token_ids, next_token_logits, option_probabilities


def mcq_prompt(tokenizer, item: MCQItem, system: str | None = None) -> str:
    options = "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(item.options))
    user = f"{item.question}\n\n{options}\n\nAnswer with the letter of the correct option."
    return format_prompt(tokenizer, user, system) + ANSWER_PREFIX


def mcq_texts(tokenizer, items: list[MCQItem], system: str | None = None) -> list[str]:
    return [mcq_prompt(tokenizer, it, system) for it in items]


def mcq_from_logits(items: list[MCQItem], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, p_answer) from the (items, len(LETTERS)) logits of the option letters; each item is
    scored over its own letters (items may have different option counts)."""
    correct, p_answer = torch.zeros(len(items)), torch.zeros(len(items))
    for r, it in enumerate(items):
        row = logits[r, : len(it.options)]
        a = LETTERS.index(it.answer)
        correct[r] = float(int(row.argmax()) == a)
        p_answer[r] = option_probabilities(row)[a]
    return correct, p_answer


def mcq_correct(
    model,
    tokenizer,
    items: list[MCQItem],
    *,
    batch_size: int = 8,
    system: str | None = None,
    progress: bool = False,
    desc: str = "MCQ",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, p_answer) per item: 1.0 where the answer letter wins, and its normalised probability."""
    logits = next_token_logits(
        model,
        tokenizer,
        mcq_texts(tokenizer, items, system),
        letter_token_ids(tokenizer, LETTERS),
        batch_size=batch_size,
        progress=progress,
        desc=desc,
    )
    return mcq_from_logits(items, logits)
