"""Held-out measures of trained vectors, as the main job takes them: preference margin on the first 40
test pairs and scored greedy generations (transformers) on the next 48 test prompts, at m = -1 and
m = +1, paired against the unsteered model.

    .venv/bin/python scripts/score_vectors.py BEHAVIOUR OUT.json VECTOR.safetensors [...]
"""

import json
import sys
from pathlib import Path

if __name__ == "__main__":
    import yapo_fast as yf
    from yapo_fast.atomic import write_text_atomic
    from yapo_fast.data.pairs import behaviour_path, load_pairs
    from yapo_fast.eval.evaluate import generate
    from yapo_fast.eval.generation import scored_generations
    from yapo_fast.eval.margin import margin_effects

    behaviour, out, paths = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    model, tok = yf.load_model()
    sae = yf.load_sae()
    vectors = {Path(p).stem: yf.load_vector(p) for p in paths}
    test = load_pairs(behaviour_path(behaviour, "test"), limit=88)
    margins, base = margin_effects(model, tok, test[:40], vectors, sae=sae)

    def gen(prompts, vec, m):
        return generate(model, tok, prompts, vec, m, sae=sae, max_new_tokens=32)

    scored = scored_generations([p.prompt for p in test[40:]], vectors, gen, behaviour)
    result = {
        "behaviour": behaviour,
        "vectors": paths,
        "margin": margins,
        "margin_unsteered_mean": float(base.mean()),
        "generation": {k: v for k, v in scored.items() if k != "rows"},
        "rows": scored["rows"],
    }
    write_text_atomic(out, json.dumps(result, indent=1))
    for name in vectors:
        m = {e["multiplier"]: e["delta"] for e in margins[name]}
        g = {e["multiplier"]: e["delta"] for e in scored["effects"][name]}
        print(f"{name}: margin {m[-1.0]:+.2f} / {m[1.0]:+.2f}, generation {g[-1.0]:+.2f} / {g[1.0]:+.2f}")
