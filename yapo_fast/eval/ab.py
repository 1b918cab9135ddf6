"""Behaviour A/B evaluation (BiPO's test_infer.csv: question, A, B, matching).

The score of an item is the probability of the matching option, normalised over the two option
letters, with the prompt through the chat template and the answer starting "Answer: (". Its mean
over the test set, at several multipliers, is the steering curve.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from yapo_fast.chat import format_prompt
from yapo_fast.errors import YapoFastError
from yapo_fast.eval.score import ANSWER_PREFIX, letter_token_ids, next_token_logits, option_probabilities


@dataclass(frozen=True)
class ABItem:
    question: str
    a: str
    b: str
    matching: str  # "A" or "B": the option showing the behaviour


def is_ab_file(path: str | Path) -> bool:
    """Whether a CSV has the A/B columns (BiPO's jailbreak test_infer.csv has open-ended prompts instead)."""
    with Path(path).open(encoding="utf-8", newline="") as f:
        return {"question", "A", "B", "matching"} <= set(csv.DictReader(f).fieldnames or [])


def load_ab_items(path: str | Path, limit: int | None = None) -> list[ABItem]:
    path = Path(path)
    if not path.is_file():
        raise YapoFastError(f"no A/B test file at {path}")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"question", "A", "B", "matching"} - set(reader.fieldnames or [])
        if missing:
            raise YapoFastError(
                f"{path}: lacks column(s) {sorted(missing)}; an A/B file has question, A, B, matching "
                "(BiPO's test_infer.csv; jailbreak's has none: evaluate it by generation)"
            )
        items = []
        for n, row in enumerate(reader, 2):
            m = row["matching"].strip().strip("()").upper()
            if m not in ("A", "B"):
                raise YapoFastError(f"{path}:{n}: matching must be A or B, got {row['matching']!r}")
            items.append(ABItem(row["question"], row["A"], row["B"], m))
            if limit and len(items) >= limit:
                break
    return items


def ab_prompt(tokenizer, item: ABItem, system: str | None = None) -> str:
    user = f"{item.question}\n\nChoices:\n(A) {item.a}\n(B) {item.b}\n\nAnswer with (A) or (B)."
    return format_prompt(tokenizer, user, system) + ANSWER_PREFIX


def ab_texts(tokenizer, items: list[ABItem], system: str | None = None) -> list[str]:
    return [ab_prompt(tokenizer, it, system) for it in items]


def ab_scores_from_logits(items: list[ABItem], logits: torch.Tensor) -> torch.Tensor:
    """Per item: the probability of the matching option, from the (items, 2) logits of letters A, B."""
    probs = option_probabilities(logits)
    col = torch.tensor([0 if it.matching == "A" else 1 for it in items])
    return probs[torch.arange(len(items)), col]


def ab_scores(
    model,
    tokenizer,
    items: list[ABItem],
    *,
    batch_size: int = 8,
    system: str | None = None,
    progress: bool = False,
    desc: str = "A/B",
) -> torch.Tensor:
    """Per item: the probability of the matching option over {A, B}."""
    logits = next_token_logits(
        model,
        tokenizer,
        ab_texts(tokenizer, items, system),
        letter_token_ids(tokenizer, "AB"),
        batch_size=batch_size,
        progress=progress,
        desc=desc,
    )
    return ab_scores_from_logits(items, logits)


def mean_ci95(values: torch.Tensor) -> tuple[float, float, float]:
    """Mean and a 95% normal-approximation confidence interval of the mean."""
    v = values.double()
    mean = float(v.mean())
    if v.numel() < 2:
        return mean, mean, mean
    half = 1.959964 * float(v.std(unbiased=True)) / v.numel() ** 0.5
    return mean, mean - half, mean + half
