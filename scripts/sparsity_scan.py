"""Sparse YaPO vectors by measurement: the main job's recipe (64 pairs, 2 epochs, batch 4, lr 2e-2,
10% warm-up, the shipped SAE) trained dense, with a support budget k (top-k projection after every
step), with an L1 soft threshold, and the dense vector pruned afterwards to its k entries of largest
effect; each measured on the held-out preference margin (first 40 test pairs, m = -1 and m = +1).

    .venv/bin/python scripts/sparsity_scan.py [behaviour] [out.json]

YAPO_SPARSITY_ONLY="dense,topk k=256 lr=0.2" runs only the named settings.
Also records per vector: non-zero entries, the share of effect mass |m v_i| * ||W_dec[i]|| in its 10
largest entries, training seconds per step. Resumable (finished settings are kept).
"""

import json
import os
import sys
import time
from pathlib import Path

KS = (16, 64, 256, 1024)
L1S = (0.5, 2.0)
SCALED = ((16, 0.5), (16, 1.0), (16, 2.0), (64, 0.2), (256, 0.1), (256, 0.2))  # (k, lr)
LONGER = ((16, 1.0, 4), (16, 0.5, 6))  # (k, lr, epochs)
PAIRS, EPOCHS, BATCH, LR, HELDOUT = 64, 2, 4, 2e-2, 40


def mass_top10(vec, sae) -> float:
    effect = (vec.values.abs() * sae.W_dec.norm(dim=1)[vec.indices]).sort(descending=True).values
    return float(effect[:10].sum() / effect.sum()) if effect.numel() else float("nan")


def main(behaviour: str, out: Path) -> dict:
    import yapo_fast as yf
    from yapo_fast.atomic import write_text_atomic
    from yapo_fast.data.pairs import behaviour_path, load_pairs
    from yapo_fast.eval.margin import margin_effects
    from yapo_fast.train.sparsity import prune_by_effect

    model, tok = yf.load_model()
    sae = yf.load_sae()
    pairs = load_pairs(behaviour_path(behaviour), limit=PAIRS)
    test = load_pairs(behaviour_path(behaviour, "test"), limit=HELDOUT)
    steps = -(-len(pairs) // BATCH) * EPOCHS
    res = json.loads(out.read_text()) if out.exists() else {"behaviour": behaviour, "settings": {}}

    def record(key, vec, seconds=None):
        effects, _ = margin_effects(model, tok, test, {"v": vec}, sae=sae, progress=False)
        res["settings"][key] = {
            "nnz": int(vec.values.numel()),
            "mass_top10": mass_top10(vec, sae),
            "seconds_per_step": None if seconds is None else seconds / steps,
            **{f"m={e['multiplier']:+g}": e for e in effects["v"]},
        }
        write_text_atomic(out, json.dumps(res, indent=1))
        s = res["settings"][key]
        print(
            f"{key}: nnz {s['nnz']}, top-10 mass {s['mass_top10']:.3f}, margin m=-1 {s['m=-1']['delta']:+.2f} "
            f"m=+1 {s['m=+1']['delta']:+.2f}",
            flush=True,
        )

    vec_dir = out.parent / "sparsity_vectors"
    runs = (
        [("dense", {}, LR, EPOCHS)]
        + [(f"topk k={k}", {"support": k}, LR, EPOCHS) for k in KS]
        + [(f"l1 {s:g}", {"l1": s}, LR, EPOCHS) for s in L1S]
        # AdamW moves an entry by about lr per step: k entries reach the dense vector's edit only with
        # larger values, so the budgeted runs also get a larger learning rate
        + [(f"topk k={k} lr={lr:g}", {"support": k}, lr, EPOCHS) for k, lr in SCALED]
        + [(f"topk k={k} lr={lr:g} epochs={e}", {"support": k}, lr, e) for k, lr, e in LONGER]
    )
    only = {k.strip() for k in os.environ.get("YAPO_SPARSITY_ONLY", "").split(",") if k.strip()}
    for key, kw, lr, epochs in runs:
        if key in res["settings"] or (only and key not in only):
            continue
        t0 = time.perf_counter()
        r = yf.train(
            "yapo",
            pairs,
            model=model,
            tokenizer=tok,
            sae=sae,
            epochs=epochs,
            batch_size=BATCH,
            lr=lr,
            warmup_steps=max(1, steps * epochs // EPOCHS // 10),
            seed=0,
            resume=False,
            progress=False,
            out=vec_dir / f"{behaviour}-{key.replace(' ', '_').replace('=', '')}.safetensors",
            **kw,
        )
        record(key, r.vector, (time.perf_counter() - t0 - r.cache_seconds) * EPOCHS / epochs)
    dense = yf.load_vector(vec_dir / f"{behaviour}-dense.safetensors")
    for k in KS:
        if f"pruned k={k}" not in res["settings"] and (not only or f"pruned k={k}" in only):
            record(f"pruned k={k}", prune_by_effect(dense, k, sae))
    return res


if __name__ == "__main__":
    behaviour = sys.argv[1] if len(sys.argv) > 1 else "hallucination"
    out = Path(sys.argv[2] if len(sys.argv) > 2 else f"bench/results/sparsity_{behaviour}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    main(behaviour, out)
