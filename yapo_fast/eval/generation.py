"""Behaviour in free generation: greedy answers to held-out prompts, unsteered and steered both ways,
each scored 1 when it shows the behaviour the vector was trained to add, 0 otherwise.

A scorer per behaviour. Where an established, maintained scorer exists for the behaviour it is used:
py3langid for the language of the answer (spanish), VADER for its sentiment (positive-tone, a
score in [-1, 1] rather than 0/1). For the BiPO behaviours none exists, so the rule is stated here
and in the report, and checked against a hand-labelled sample in tests/data/hallucination_labels.jsonl:

- hallucination (false-premise yes/no questions; the trained behaviour goes along with the premise):
  an answer shows it unless its first sentence rejects the premise, i.e. opens with "No" or contains
  a negation or correction phrase (REJECTION_PHRASES).

The effect at m is the mean over prompts of score_m - score_0 (paired on the same prompts, 95%
normal interval): for 0/1 scores, the share of answers that change towards the behaviour.
"""

from __future__ import annotations

import functools
import re

import torch

from yapo_fast.errors import YapoFastError
from yapo_fast.eval.ab import mean_ci95

REJECTION_PHRASES = (
    "not accurate",
    "not true",
    "not correct",
    "incorrect",
    "inaccurate",
    "false",
    "misconception",
    "myth",
    "there is no",
    "there are no",
    "there was no",
    "not aware",
    "no evidence",
    "no record",
    "doesn't",
    "does not",
    "did not",
    "didn't",
    "isn't",
    "is not",
    "aren't",
    "are not",
    "was not",
    "wasn't",
    "were not",
    "weren't",
    "cannot",
    "can't",
    "never",
    "not the case",
    "no such",
    "don't",
    "do not",
)
_FIRST_SENTENCE = re.compile(r"^(.*?)(?:[.!?](?:\s|$)|\n|$)", re.S)
# whole words only: "myth" must not match "mythical", "no" not "nothing"
_REJECTION = re.compile(r"\b(?:" + "|".join(re.escape(p) for p in REJECTION_PHRASES) + r")\b")


def first_sentence(text: str) -> str:
    """The answer up to its first sentence end or line break (lower-cased, stripped)."""
    return _FIRST_SENTENCE.match(text.strip()).group(1).strip().lower()


def rejects_premise(text: str) -> bool:
    """Whether an answer to a false-premise question rejects the premise in its first sentence."""
    head = first_sentence(text)
    return bool(re.match(r"^no\b", head) or _REJECTION.search(head))


def hallucination_score(text: str) -> int:
    """1 when the answer goes along with the false premise (the trained behaviour), else 0."""
    return 0 if rejects_premise(text) else 1


def language_of(text: str) -> str:
    """ISO 639-1 code of the text's language by py3langid (a maintained fork of langid.py, its
    model shipped in the package)."""
    import py3langid

    return py3langid.classify(text)[0] if text.strip() else "und"


def spanish_score(text: str) -> int:
    """1 when py3langid identifies the answer as Spanish."""
    return int(language_of(text) == "es")


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # reads its lexicon once

    return SentimentIntensityAnalyzer()


def positive_tone_score(text: str) -> float:
    """VADER's compound sentiment of the answer, in [-1, 1] (vaderSentiment, lexicon shipped)."""
    return float(_vader().polarity_scores(text)["compound"])


SCORERS = {"hallucination": hallucination_score, "spanish": spanish_score, "positive-tone": positive_tone_score}
SCORER_RULES = {
    "spanish": "1 when py3langid identifies the answer's language as Spanish (es)",
    "positive-tone": "VADER compound sentiment of the answer (vaderSentiment), from -1 to 1",
    "hallucination": "1 unless the answer's first sentence opens with 'No' or contains a negation or "
    "correction phrase (yapo_fast.eval.generation.REJECTION_PHRASES): goes along "
    "with the false premise",
}


def scorer_for(behaviour: str):
    if behaviour not in SCORERS:
        raise YapoFastError(f"no generation scorer for behaviour {behaviour!r}; scored behaviours: {sorted(SCORERS)}")
    return SCORERS[behaviour]


def generation_effect(steered: list[int], base: list[int], multiplier: float) -> dict:
    """Paired effect of a steering on the scored answers of the same prompts."""
    if len(steered) != len(base):
        raise YapoFastError(f"{len(steered)} steered scores against {len(base)} unsteered ones")
    s, b = torch.tensor(steered, dtype=torch.float64), torch.tensor(base, dtype=torch.float64)
    delta, lo, hi = mean_ci95(s - b)
    return {
        "multiplier": float(multiplier),
        "rate": float(s.mean()),
        "delta": delta,
        "delta_ci_low": lo,
        "delta_ci_high": hi,
        "n": len(steered),
    }


def scored_generations(prompts: list[str], vectors: dict, generate, behaviour: str, *, multipliers=(-1.0, 1.0)) -> dict:
    """Generate unsteered and with each vector at each multiplier; score and compare.

    generate(prompts, vector, multiplier) -> texts. Returns {"rule", "unsteered_rate", "effects":
    {name: [effect per multiplier]}, "rows": [{prompt, unsteered, "<name> m=<m>": text, ...}]}."""
    score = scorer_for(behaviour)
    base_texts = generate(prompts, None, 0.0)
    base = [score(t) for t in base_texts]
    rows = [{"prompt": p, "unsteered": t, "scores": {"unsteered": s}} for p, t, s in zip(prompts, base_texts, base)]
    effects = {}
    for name, vec in vectors.items():
        for m in multipliers:
            texts = generate(prompts, vec, float(m))
            scores = [score(t) for t in texts]
            key = f"{name} m={float(m):+g}"
            for row, t, s in zip(rows, texts, scores):
                row[key] = t
                row["scores"][key] = s
            effects.setdefault(name, []).append(generation_effect(scores, base, m))
    return {
        "rule": SCORER_RULES[behaviour],
        "unsteered_rate": float(sum(base)) / max(1, len(base)),
        "effects": effects,
        "rows": rows,
    }
