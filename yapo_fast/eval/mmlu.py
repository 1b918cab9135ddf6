"""General knowledge: MMLU accuracy on a fixed, shipped subset, k-shot.

Subset (yapo_fast/assets/data/mmlu, from github hendrycks/test at commit 785eba5, MIT): 10 subjects
(SUBJECTS below), the first 20 test questions of each (200 items) and the 5 dev questions of each
as the few-shot pool. A prompt is Hendrycks' format inside the chat template: "The following are
multiple choice questions (with answers) about <subject>.", then k solved dev questions of the same
subject (k = `shots`, default 2; 5 in the original paper, fewer here to keep CPU time down), then
the question; the answer starts "Answer: (" and the option letter with the largest logit among
A-D is the model's answer.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from yapo_fast.chat import format_prompt
from yapo_fast.data.blend import MCQItem
from yapo_fast.errors import YapoFastError
from yapo_fast.eval.score import ANSWER_PREFIX, letter_token_ids, next_token_logits

MMLU_DIR = Path(__file__).resolve().parents[1] / "assets" / "data" / "mmlu"
SUBJECTS = (
    "high_school_geography",
    "high_school_psychology",
    "marketing",
    "nutrition",
    "sociology",
    "us_foreign_policy",
    "world_religions",
    "high_school_biology",
    "miscellaneous",
    "computer_security",
)


def load_mmlu(split: str = "test", per_subject: int | None = None, directory: Path = MMLU_DIR) -> list[MCQItem]:
    """Items of the shipped subset (`per_subject`: the first N of each subject)."""
    path = Path(directory) / f"mmlu_subset_{split}.csv"
    if not path.is_file():
        raise YapoFastError(f"no MMLU subset at {path}")
    items, seen = [], {}
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            s = row["subject"]
            seen[s] = seen.get(s, 0) + 1
            if per_subject is not None and seen[s] > per_subject:
                continue
            items.append(
                MCQItem(
                    question=row["question"],
                    options=[row[c] for c in "ABCD"],
                    answer=row["answer"],
                    id=f"{s}/{seen[s]}",
                    country=s,
                )
            )  # country field holds the subject here
    return items


def _block(item: MCQItem, answer: bool) -> str:
    opts = "\n".join(f"({c}) {o}" for c, o in zip("ABCD", item.options))
    return f"{item.question}\n{opts}\n" + (f"Answer: ({item.answer})\n\n" if answer else "")


def mmlu_prompt(tokenizer, item: MCQItem, shots: list[MCQItem], system: str | None = None) -> str:
    subject = item.country.replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    user = head + "".join(_block(s, True) for s in shots) + _block(item, False).rstrip("\n")
    return format_prompt(tokenizer, user, system) + ANSWER_PREFIX


def mmlu_texts(tokenizer, items: list[MCQItem], *, shots: int = 2, dev: list[MCQItem] | None = None) -> list[str]:
    """The k-shot prompt of each item (the first `shots` dev questions of its subject)."""
    dev = load_mmlu("dev") if dev is None else dev
    pool: dict[str, list[MCQItem]] = {}
    for d in dev:
        pool.setdefault(d.country, []).append(d)
    for it in items:
        if len(pool.get(it.country, [])) < shots:
            raise YapoFastError(
                f"MMLU subject {it.country!r} has {len(pool.get(it.country, []))} dev questions, "
                f"fewer than shots={shots}"
            )
    return [mmlu_prompt(tokenizer, it, pool[it.country][:shots]) for it in items]


def mmlu_from_logits(items: list[MCQItem], logits: torch.Tensor) -> torch.Tensor:
    """1.0 per item whose answer letter has the largest of the (items, 4) A-D logits."""
    answers = torch.tensor(["ABCD".index(it.answer) for it in items])
    return (logits.argmax(-1) == answers).float()


def mmlu_correct(
    model,
    tokenizer,
    items: list[MCQItem],
    *,
    shots: int = 2,
    dev: list[MCQItem] | None = None,
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "MMLU",
) -> torch.Tensor:
    """1.0 per item the model answers right."""
    texts = mmlu_texts(tokenizer, items, shots=shots, dev=dev)
    logits = next_token_logits(
        model,
        tokenizer,
        texts,
        letter_token_ids(tokenizer, "ABCD"),
        batch_size=batch_size,
        progress=progress,
        desc=desc,
    )
    return mmlu_from_logits(items, logits)
