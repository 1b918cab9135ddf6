"""yapo_fast.evaluate: does a vector steer, does the model keep its knowledge.

    results = yapo_fast.evaluate(model, tok, sae=sae,
                                 behaviour_vectors={"hallucination": {"yapo": v1, "bipo": v2, "caa": v3}},
                                 country_vectors={"Spain": {"yapo": v4}})
    yapo_fast.report.write_report(results, "runs/eval")

Parts (each skipped when it has nothing to evaluate):
- steering curves: per behaviour and method, the mean probability of the matching A/B option
  (BiPO test_infer.csv) at each multiplier, with a 95% confidence interval (eval_ab.py);
- cultural multiple choice (BLEnD, blend.py): per country, accuracy unsteered and with each of the
  country's vectors, localized and non-localized, and the localization gap (eval_mcq.py);
- MMLU on the shipped subset, unsteered and with each vector (eval_mmlu.py);
- open-ended generations, unsteered and steered, side by side.
Scoring runs through transformers (eval_score.py); generation through vLLM when `generate_fn` is
given (main_job passes one when vLLM is installed), else transformers.
Multiplier 0 is the unsteered model for every method (h' = h exactly), so it is computed once.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .data import bipo_csv_path
from .errors import YapoFastError
from .eval_ab import ab_scores, is_ab_file, load_ab_items, mean_ci95
from .eval_mcq import mcq_correct
from .eval_mmlu import load_mmlu, mmlu_correct
from .integrations.hf_hooks import steer
from .model import model_identity

MULTIPLIERS = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)


def _steered(model, vector, multiplier, sae):
    """A steering context (or a no-op one for no vector / multiplier 0)."""
    import contextlib

    if vector is None or multiplier == 0:
        return contextlib.nullcontext()
    return steer(model, vector, multiplier, sae=sae if vector.is_sparse else None)


def _vector_meta(vector) -> dict:
    return {"method": vector.method, "layer": vector.layer, "nnz": int((vector.values != 0).sum()),
            "norm": float(vector.values.norm()), "sae": (vector.sae or {}).get("name"), "info": vector.info}


def steering_curve(model, tokenizer, items, vector, *, sae=None, multipliers=MULTIPLIERS, baseline=None,
                   batch_size: int = 8, progress: bool = True, desc: str = "") -> list[dict]:
    """[{multiplier, mean, ci_low, ci_high, n}] of the matching option's probability."""
    points = []
    for m in multipliers:
        if m == 0 and baseline is not None:
            scores = baseline
        else:
            with _steered(model, vector, m, sae):
                scores = ab_scores(model, tokenizer, items, batch_size=batch_size, progress=progress,
                                   desc=f"{desc} m={m:g}")
        mean, lo, hi = mean_ci95(scores)
        points.append({"multiplier": float(m), "mean": mean, "ci_low": lo, "ci_high": hi, "n": len(items)})
    return points


def evaluate(model, tokenizer, *, sae=None, behaviour_vectors: dict | None = None, country_vectors: dict | None = None,
             multipliers=MULTIPLIERS, ab_limit: int | None = None, ab_files: dict | None = None,
             mcq_limit: int | None = None, culture_multiplier: float = 1.0,
             mmlu_per_subject: int | None = None, mmlu_shots: int = 2, mmlu_multiplier: float = 1.0,
             mmlu: bool = True, generation_prompts: dict | None = None, generation_multiplier: float = 1.0,
             max_new_tokens: int = 48, generate_fn=None, batch_size: int = 8, progress: bool = True,
             parts=("ab", "culture", "mmlu", "generations")) -> dict:
    """Evaluate vectors; returns a JSON-ready dict (see yapo_fast.report for the files made from it).

    behaviour_vectors: {behaviour: {name: SteeringVector}} scored on that behaviour's A/B test set
    (ab_files[behaviour] or the shipped bipo/<behaviour>/test_infer.csv).
    country_vectors: {country: {name: SteeringVector}} scored on the country's BLEnD items.
    generation_prompts: {behaviour: [prompt, ...]} generated unsteered and with each of its vectors.
    parts: which of "ab", "culture", "mmlu", "generations" to run (a long evaluation can run them
    one at a time and merge the dicts).
    """
    from . import blend

    behaviour_vectors = behaviour_vectors or {}
    country_vectors = country_vectors or {}
    for group in (*behaviour_vectors.values(), *country_vectors.values()):
        for name, vec in group.items():
            if vec.is_sparse and sae is None:
                raise YapoFastError(f"vector {name!r} is a yapo vector: pass the SAE it was trained with (sae=...)")
    ident = model_identity(model)
    results: dict = {
        "meta": {"model": ident.get("name") or type(model).__name__, "model_identity": ident,
                 "sae": None if sae is None else {"name": sae.name, "kind": sae.kind, "d_sae": sae.d_sae,
                                                   "layer": sae.layer, "hash": sae.weights_hash()},
                 "multipliers": [float(m) for m in multipliers], "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "vectors": {f"{k}/{n}": _vector_meta(v) for k, g in {**behaviour_vectors, **country_vectors}.items()
                             for n, v in g.items()}},
        "ab": {}, "culture": {}, "mmlu": None, "generations": {},
    }
    t0 = time.perf_counter()

    # ---- behaviour steering curves --------------------------------------------------------------
    for behaviour, vectors in (behaviour_vectors if "ab" in parts else {}).items():
        path = (ab_files or {}).get(behaviour) or bipo_csv_path(behaviour, "test_infer")
        if not is_ab_file(path):  # e.g. jailbreak: open-ended prompts, evaluated by generation only
            results["ab_skipped"] = {**results.get("ab_skipped", {}), behaviour: f"{path} has no A/B columns"}
            continue
        items = load_ab_items(path, limit=ab_limit)
        base = ab_scores(model, tokenizer, items, batch_size=batch_size, progress=progress, desc=f"{behaviour} unsteered")
        entry = {"data": str(path), "n": len(items), "baseline": mean_ci95(base)[0], "curves": {}}
        for name, vec in vectors.items():
            entry["curves"][name] = steering_curve(model, tokenizer, items, vec, sae=sae, multipliers=multipliers,
                                                   baseline=base, batch_size=batch_size, progress=progress,
                                                   desc=f"{behaviour} {name}")
        results["ab"][behaviour] = entry

    # ---- cultural multiple choice -----------------------------------------------------------------
    if country_vectors and "culture" in parts:
        digest = blend.load_digest()
        for country, vectors in country_vectors.items():
            entry = {"multiplier": culture_multiplier}
            for setting in ("localized", "non_localized"):
                items = blend.mcq_items(country, setting, limit=mcq_limit, digest=digest)
                if not items:
                    raise YapoFastError(f"no {setting} BLEnD items for {country}")
                acc = {}
                for name, vec in (("unsteered", None), *vectors.items()):
                    with _steered(model, vec, culture_multiplier, sae):
                        correct, _ = mcq_correct(model, tokenizer, items, batch_size=batch_size, progress=progress,
                                                 desc=f"{country} {setting} {name}")
                    mean, lo, hi = mean_ci95(correct)
                    acc[name] = {"accuracy": mean, "ci_low": lo, "ci_high": hi}
                entry[setting] = {"n": len(items), "accuracy": acc}
            entry["gap"] = {name: entry["localized"]["accuracy"][name]["accuracy"]
                            - entry["non_localized"]["accuracy"][name]["accuracy"]
                            for name in entry["localized"]["accuracy"]}
            results["culture"][country] = entry

    # ---- MMLU before/after --------------------------------------------------------------------------
    all_vectors = {f"{k}/{n}": v for k, g in {**behaviour_vectors, **country_vectors}.items() for n, v in g.items()}
    if mmlu and all_vectors and "mmlu" in parts:
        items = load_mmlu("test", per_subject=mmlu_per_subject)
        accs = {}
        for name, vec in (("unsteered", None), *all_vectors.items()):
            with _steered(model, vec, mmlu_multiplier, sae):
                correct = mmlu_correct(model, tokenizer, items, shots=mmlu_shots, batch_size=max(1, batch_size // 2),
                                       progress=progress, desc=f"MMLU {name}")
            mean, lo, hi = mean_ci95(correct)
            accs[name] = {"accuracy": mean, "ci_low": lo, "ci_high": hi}
        results["mmlu"] = {"n": len(items), "shots": mmlu_shots, "per_subject": mmlu_per_subject,
                           "multiplier": mmlu_multiplier, "accuracy": accs,
                           "change": {k: v["accuracy"] - accs["unsteered"]["accuracy"] for k, v in accs.items()
                                      if k != "unsteered"}}

    # ---- open-ended generations side by side -----------------------------------------------------------
    for behaviour, prompts in ((generation_prompts or {}) if "generations" in parts else {}).items():
        vectors = behaviour_vectors.get(behaviour, {})
        rows = [{"prompt": p} for p in prompts]
        for name, vec in tqdm((("unsteered", None), *vectors.items()), desc=f"generate {behaviour}",
                              disable=not progress):
            texts = generate(model, tokenizer, prompts, vec, generation_multiplier, sae=sae,
                             max_new_tokens=max_new_tokens, generate_fn=generate_fn)
            for row, text in zip(rows, texts):
                row[name] = text
        results["generations"][behaviour] = {"multiplier": generation_multiplier, "rows": rows}
    results["meta"]["seconds"] = time.perf_counter() - t0
    return results


def generate(model, tokenizer, prompts, vector, multiplier, *, sae=None, max_new_tokens=48, generate_fn=None):
    """Greedy completions, steered by `vector` (None: unsteered). generate_fn(prompts, vector,
    multiplier, max_new_tokens) -> texts overrides transformers (e.g. the vLLM engine)."""
    if generate_fn is not None:
        return generate_fn(prompts, vector, multiplier, max_new_tokens)
    from .hf_generate import generate_text

    with _steered(model, vector, multiplier, sae):
        return generate_text(model, tokenizer, prompts, max_new_tokens=max_new_tokens)


def as_float_list(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t]
