"""yapo_fast.eval.evaluate: does a vector steer, does the model keep its knowledge.

    results = yapo_fast.eval.evaluate(model, tok, sae=sae,
                                 behaviour_vectors={"hallucination": {"yapo": v1, "bipo": v2, "caa": v3}},
                                 country_vectors={"Spain": {"yapo": v4}})
    yapo_fast.eval.report.write_report(results, "runs/eval")

Parts (each skipped when it has nothing to evaluate):
- steering curves: per behaviour and method, the mean probability of the matching A/B option
  (BiPO test_infer.csv) at each multiplier, with a 95% confidence interval (eval_ab.py);
- cultural multiple choice (BLEnD, blend.py): per country, accuracy unsteered and with each of the
  country's vectors, localized and non-localized, and the localization gap (eval_mcq.py);
- MMLU on the shipped subset, unsteered and with each vector (eval_mmlu.py);
- open-ended generations, unsteered and steered, side by side.
Scoring runs through transformers (eval_score.py): for Llama-style models layers 0..L run once per
batch and only the layers above L once per (vector, multiplier), which is exact (steering changes
nothing below L) and about halves a curve's cost; other models are scored with a hook per steering.
Generation goes through vLLM when `generate_fn` is given (main_job passes one when vLLM is
installed), else transformers. Multiplier 0 is the unsteered model for every method (h' = h
exactly), so it is computed once. `vector_scale` (eval_scale.py) records how large each vector's
edit of the residual stream is, so a flat curve can be told apart from a vector too small to act.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from yapo_fast.chat import format_prompt
from yapo_fast.data.pairs import bipo_csv_path, load_pairs
from yapo_fast.errors import YapoFastError
from yapo_fast.eval.ab import ab_scores_from_logits, ab_texts, is_ab_file, load_ab_items, mean_ci95
from yapo_fast.eval.mcq import mcq_from_logits, mcq_texts
from yapo_fast.eval.mmlu import load_mmlu, mmlu_from_logits, mmlu_texts
from yapo_fast.eval.score import letter_token_ids, next_token_logits, steered_next_token_logits
from yapo_fast.integrations.hf_hooks import steer
from yapo_fast.model import model_identity

MULTIPLIERS = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)


def _steered(model, vector, multiplier, sae):
    """A steering context (or a no-op one for no vector / multiplier 0)."""
    import contextlib

    if vector is None or multiplier == 0:
        return contextlib.nullcontext()
    return steer(model, vector, multiplier, sae=sae)


def _vector_meta(vector) -> dict:
    return {
        "method": vector.method,
        "layer": vector.layer,
        "nnz": int((vector.values != 0).sum()),
        "norm": float(vector.values.norm()),
        "sae": (vector.sae or {}).get("name"),
        "info": vector.info,
    }


def _prefix_reuse(model) -> bool:
    """Whether the model runs as a Llama-style layer stack (train.lean.DecoderRunner)."""
    from yapo_fast.train.lean import DecoderRunner

    try:
        DecoderRunner(model)
    except YapoFastError:
        return False
    return True


def score_steerings(
    model,
    tokenizer,
    texts: list[str],
    letter_ids: list[int],
    steerings: dict,
    *,
    sae=None,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "",
) -> dict:
    """{key: (texts, letters) logits} for steerings {key: (vector, multiplier)}; (None, 0) is unsteered.

    Steerings of the same layer share one pass through the layers below it (see the module doc)."""
    from yapo_fast.steering import make_steer_fn

    out = {}
    if _prefix_reuse(model):
        by_layer: dict[int, dict] = {}
        for key, (vec, m) in steerings.items():
            if vec is None or m == 0:
                by_layer.setdefault(None, {})[key] = None
            else:
                by_layer.setdefault(vec.layer, {})[key] = make_steer_fn(vec, m, sae=sae)
        plain = by_layer.pop(None, {})
        if plain and not by_layer:  # unsteered only
            logits = next_token_logits(
                model, tokenizer, texts, letter_ids, batch_size=batch_size, progress=progress, desc=f"{desc} unsteered"
            )
            return {key: logits for key in plain}
        for n, (layer, fns) in enumerate(by_layer.items()):
            fns = {**(plain if n == 0 else {}), **fns}  # the unsteered logits come with the first layer's pass
            out.update(
                steered_next_token_logits(
                    model,
                    tokenizer,
                    texts,
                    letter_ids,
                    layer,
                    fns,
                    batch_size=batch_size,
                    progress=progress,
                    desc=f"{desc} L{layer} x{len(fns)}",
                )
            )
        return out
    for key, (vec, m) in steerings.items():  # any other model: one hooked forward per steering
        with _steered(model, vec, m, sae):
            out[key] = next_token_logits(
                model, tokenizer, texts, letter_ids, batch_size=batch_size, progress=progress, desc=f"{desc} {key}"
            )
    return out


def steering_curve(
    model,
    tokenizer,
    items,
    vector,
    *,
    sae=None,
    multipliers=MULTIPLIERS,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "",
) -> list[dict]:
    """[{multiplier, mean, ci_low, ci_high, n}] of the matching option's probability."""
    curves, _ = steering_curves(
        model,
        tokenizer,
        items,
        {"v": vector},
        sae=sae,
        multipliers=multipliers,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
    )
    return curves["v"]


def steering_curves(
    model,
    tokenizer,
    items,
    vectors: dict,
    *,
    sae=None,
    multipliers=MULTIPLIERS,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "",
):
    """({name: curve}, unsteered scores) for every vector at every multiplier, in one scoring sweep."""
    steerings = {("unsteered", 0.0): (None, 0.0)}
    steerings.update(
        {(name, float(m)): (vec, float(m)) for name, vec in vectors.items() for m in multipliers if m != 0}
    )
    logits = score_steerings(
        model,
        tokenizer,
        ab_texts(tokenizer, items),
        letter_token_ids(tokenizer, "AB"),
        steerings,
        sae=sae,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
    )
    scores = {key: ab_scores_from_logits(items, lg) for key, lg in logits.items()}
    base = scores[("unsteered", 0.0)]
    curves = {}
    for name in vectors:
        points = []
        for m in multipliers:
            steered = base if m == 0 else scores[(name, float(m))]
            mean, lo, hi = mean_ci95(steered)
            # the effect against unsteered on the same items (paired: far tighter than the two CIs)
            delta, d_lo, d_hi = mean_ci95(steered - base)
            points.append(
                {
                    "multiplier": float(m),
                    "mean": mean,
                    "ci_low": lo,
                    "ci_high": hi,
                    "n": len(items),
                    "delta": delta,
                    "delta_ci_low": d_lo,
                    "delta_ci_high": d_hi,
                }
            )
        curves[name] = points
    return curves, base


def evaluate(
    model,
    tokenizer,
    *,
    sae=None,
    behaviour_vectors: dict | None = None,
    country_vectors: dict | None = None,
    multipliers=MULTIPLIERS,
    ab_limit: int | None = None,
    ab_files: dict | None = None,
    mcq_limit: int | None = None,
    culture_multiplier: float = 1.0,
    mmlu_per_subject: int | None = None,
    mmlu_shots: int = 2,
    mmlu_multiplier: float = 1.0,
    mmlu: bool = True,
    generation_prompts: dict | None = None,
    generation_multiplier: float = 1.0,
    max_new_tokens: int = 48,
    generate_fn=None,
    batch_size: int = 8,
    progress: bool = True,
    scale_prompts: int = 12,
    parts=("scale", "ab", "culture", "mmlu", "generations"),
) -> dict:
    """Evaluate vectors; returns a JSON-ready dict (see yapo_fast.eval.report for the files made from it).

    behaviour_vectors: {behaviour: {name: SteeringVector}} scored on that behaviour's A/B test set
    (ab_files[behaviour] or the shipped bipo/<behaviour>/test_infer.csv).
    country_vectors: {country: {name: SteeringVector}} scored on the country's BLEnD items.
    generation_prompts: {behaviour: [prompt, ...]} generated unsteered and with each of its vectors.
    parts: which of "scale", "ab", "culture", "mmlu", "generations" to run (a long evaluation can run
    them one at a time and merge the dicts). "scale": each vector's edit of the residual stream at
    m=1 on `scale_prompts` of its own prompts (eval_scale.py).
    """
    from yapo_fast.data import blend
    from yapo_fast.data.blend import LETTERS

    behaviour_vectors = behaviour_vectors or {}
    country_vectors = country_vectors or {}
    for group in (*behaviour_vectors.values(), *country_vectors.values()):
        for name, vec in group.items():
            if vec.is_sparse and sae is None:
                raise YapoFastError(f"vector {name!r} is a yapo vector: pass the SAE it was trained with (sae=...)")
    ident = model_identity(model)
    results: dict = {
        "meta": {
            "model": ident.get("name") or type(model).__name__,
            "model_identity": ident,
            "sae": None
            if sae is None
            else {
                "name": sae.name,
                "kind": sae.kind,
                "d_sae": sae.d_sae,
                "layer": sae.layer,
                "hash": sae.weights_hash(),
            },
            "multipliers": [float(m) for m in multipliers],
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "vectors": {
                f"{k}/{n}": _vector_meta(v)
                for k, g in {**behaviour_vectors, **country_vectors}.items()
                for n, v in g.items()
            },
        },
        "ab": {},
        "culture": {},
        "mmlu": None,
        "generations": {},
        "scale": {},
    }
    t0 = time.perf_counter()

    # ---- how large is each vector's edit (before reading any curve) -------------------------------
    if "scale" in parts and scale_prompts:
        from yapo_fast.eval.scale import layer_states, vector_scale

        for kind, groups in (("behaviour", behaviour_vectors), ("country", country_vectors)):
            for key, vectors in groups.items():
                if kind == "country":
                    texts = mcq_texts(tokenizer, blend.mcq_items(key, "non_localized", limit=scale_prompts))
                else:
                    path = (ab_files or {}).get(key) or bipo_csv_path(key, "test_infer")
                    texts = (
                        ab_texts(tokenizer, load_ab_items(path, limit=scale_prompts))
                        if is_ab_file(path)
                        else [format_prompt(tokenizer, p.prompt) for p in load_pairs(path, limit=scale_prompts)]
                    )
                states = {}
                for name, vec in vectors.items():
                    if vec.layer not in states:
                        states[vec.layer] = layer_states(model, tokenizer, texts, vec.layer)
                    results["scale"][f"{key}/{name}"] = vector_scale(vec, states[vec.layer], sae=sae)

    # ---- behaviour steering curves --------------------------------------------------------------
    for behaviour, vectors in (behaviour_vectors if "ab" in parts else {}).items():
        path = (ab_files or {}).get(behaviour) or bipo_csv_path(behaviour, "test_infer")
        if not is_ab_file(path):  # e.g. jailbreak: open-ended prompts, evaluated by generation only
            results["ab_skipped"] = {**results.get("ab_skipped", {}), behaviour: f"{path} has no A/B columns"}
            continue
        items = load_ab_items(path, limit=ab_limit)
        curves, base = steering_curves(
            model,
            tokenizer,
            items,
            vectors,
            sae=sae,
            multipliers=multipliers,
            batch_size=batch_size,
            progress=progress,
            desc=behaviour,
        )
        entry = {"data": str(path), "n": len(items), "baseline": mean_ci95(base)[0], "curves": curves}
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
                steerings = {name: (vec, culture_multiplier) for name, vec in (("unsteered", None), *vectors.items())}
                logits = score_steerings(
                    model,
                    tokenizer,
                    mcq_texts(tokenizer, items),
                    letter_token_ids(tokenizer, LETTERS),
                    steerings,
                    sae=sae,
                    batch_size=batch_size,
                    progress=progress,
                    desc=f"{country} {setting}",
                )
                acc = {}
                for name in steerings:
                    mean, lo, hi = mean_ci95(mcq_from_logits(items, logits[name])[0])
                    acc[name] = {"accuracy": mean, "ci_low": lo, "ci_high": hi}
                entry[setting] = {"n": len(items), "accuracy": acc}
            entry["gap"] = {
                name: entry["localized"]["accuracy"][name]["accuracy"]
                - entry["non_localized"]["accuracy"][name]["accuracy"]
                for name in entry["localized"]["accuracy"]
            }
            results["culture"][country] = entry

    # ---- MMLU before/after --------------------------------------------------------------------------
    all_vectors = {f"{k}/{n}": v for k, g in {**behaviour_vectors, **country_vectors}.items() for n, v in g.items()}
    if mmlu and all_vectors and "mmlu" in parts:
        items = load_mmlu("test", per_subject=mmlu_per_subject)
        steerings = {name: (vec, mmlu_multiplier) for name, vec in (("unsteered", None), *all_vectors.items())}
        logits = score_steerings(
            model,
            tokenizer,
            mmlu_texts(tokenizer, items, shots=mmlu_shots),
            letter_token_ids(tokenizer, "ABCD"),
            steerings,
            sae=sae,
            batch_size=max(1, batch_size // 2),
            progress=progress,
            desc="MMLU",
        )
        correct = {name: mmlu_from_logits(items, lg) for name, lg in logits.items()}
        accs, change, change_ci = {}, {}, {}
        for name, c in correct.items():
            mean, lo, hi = mean_ci95(c)
            accs[name] = {"accuracy": mean, "ci_low": lo, "ci_high": hi}
            if name != "unsteered":  # paired over the same items
                change[name], d_lo, d_hi = mean_ci95(c - correct["unsteered"])
                change_ci[name] = [d_lo, d_hi]
        results["mmlu"] = {
            "n": len(items),
            "shots": mmlu_shots,
            "per_subject": mmlu_per_subject,
            "multiplier": mmlu_multiplier,
            "accuracy": accs,
            "change": change,
            "change_ci95": change_ci,
        }

    # ---- open-ended generations side by side -----------------------------------------------------------
    for behaviour, prompts in ((generation_prompts or {}) if "generations" in parts else {}).items():
        vectors = behaviour_vectors.get(behaviour, {})
        rows = [{"prompt": p} for p in prompts]
        for name, vec in tqdm(
            (("unsteered", None), *vectors.items()), desc=f"generate {behaviour}", disable=not progress
        ):
            texts = generate(
                model,
                tokenizer,
                prompts,
                vec,
                generation_multiplier,
                sae=sae,
                max_new_tokens=max_new_tokens,
                generate_fn=generate_fn,
            )
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
    from yapo_fast.eval.generate import generate_text

    with _steered(model, vector, multiplier, sae):
        return generate_text(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
