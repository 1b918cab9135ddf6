"""The README's evaluation on the embedded default model and its shipped SAE (slow on a CPU: run
it in the background). Trains YaPO, BiPO and CAA per behaviour and a YaPO and CAA vector per
country, evaluates them (steering curves, BLEnD localized/non-localized, MMLU subset) and writes
results.json, report.md and plots into --out. Every trained vector is saved and reused on rerun.

    nice -n 5 .venv/bin/python scripts/eval_default.py --out runs/eval-default > runs/eval-default.log 2>&1 &
"""

import argparse
import json
import time
from pathlib import Path

from yapo_fast import load_model, load_sae, load_vector, train
from yapo_fast.data import blend
from yapo_fast.data.pairs import bipo_csv_path, load_pairs
from yapo_fast.eval.evaluate import evaluate
from yapo_fast.eval.report import write_report


def get_vector(method, pairs, model, tok, sae, out, training, key, data, args, layer):
    path = out / "vectors" / f"{key.replace('/', '-')}.safetensors"
    if path.exists() and (out / "vectors" / f"{key.replace('/', '-')}.json").exists():
        training[key] = json.loads((out / "vectors" / f"{key.replace('/', '-')}.json").read_text())
        return load_vector(path)
    steps = -(-len(pairs) // args.batch_size) * args.epochs
    res = train(
        method,
        pairs,
        model=model,
        tokenizer=tok,
        sae=sae if method == "yapo" else None,
        layer=layer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=max(1, steps // 10),
        out=path,
        resume=True,
    )
    training[key] = {
        "seconds": res.seconds,
        "steps": res.steps,
        "pairs": len(pairs),
        "data": data,
        "losses": res.losses,
        "lr": args.lr,
    }
    (out / "vectors" / f"{key.replace('/', '-')}.json").write_text(json.dumps(training[key]))
    return res.vector


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/eval-default")
    ap.add_argument("--behaviours", default="hallucination,power-seeking")
    ap.add_argument("--countries", default="Spain,China")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--culture-pairs", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--ab-items", type=int, default=60)
    ap.add_argument("--mcq-items", type=int, default=60)
    ap.add_argument("--mmlu-per-subject", type=int, default=4)
    ap.add_argument("--mmlu-shots", type=int, default=1)
    ap.add_argument("--culture-multiplier", type=float, default=1.0)
    ap.add_argument("--methods", default="yapo,bipo,caa", help="methods trained per behaviour")
    ap.add_argument("--country-methods", default="yapo,caa", help="methods trained per country")
    ap.add_argument("--sae", default=None, help="SAE directory (default: the shipped one)")
    ap.add_argument("--layer", type=int, default=15, help="layer when no SAE is used (else the SAE's)")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.time()
    model, tok = load_model()
    methods, cmethods = args.methods.split(","), args.country_methods.split(",")
    sae = load_sae(args.sae) if "yapo" in methods + cmethods else None
    layer = sae.layer if sae is not None else args.layer
    training, bv, cv = {}, {}, {}
    common = dict(
        sae=sae,
        ab_limit=args.ab_items,
        mcq_limit=args.mcq_items,
        culture_multiplier=args.culture_multiplier,
        mmlu_per_subject=args.mmlu_per_subject,
        mmlu_shots=args.mmlu_shots,
        max_new_tokens=40,
    )
    res = None

    def merge(part):  # stage by stage, the report rewritten after each: a long run yields what it has
        nonlocal res
        if res is None:
            res = part
        else:
            for key in ("ab", "culture", "generations"):
                res[key].update(part[key])
            res["mmlu"] = part["mmlu"] or res["mmlu"]
            res["meta"]["vectors"].update(part["meta"]["vectors"])
        res["training"] = training
        res["meta"]["suite"] = {**vars(args), "seconds": time.time() - t0}
        print(f"report: {write_report(res, out)['markdown']}", flush=True)

    for b in args.behaviours.split(","):
        pairs = load_pairs(bipo_csv_path(b), limit=args.pairs)
        bv[b] = {
            m: get_vector(m, pairs, model, tok, sae, out, training, f"{b}/{m}", str(bipo_csv_path(b)), args, layer)
            for m in methods
        }
        merge(evaluate(model, tok, behaviour_vectors={b: bv[b]}, parts=("ab",), **common))
    digest = blend.load_digest()
    for c in args.countries.split(","):
        half = args.culture_pairs // 2  # localized and non-localized prompts, half each
        pairs = blend.preference_pairs(c, "localized", limit=half, digest=digest) + blend.preference_pairs(
            c, "non_localized", limit=half, digest=digest
        )
        cv[c] = {
            m: get_vector(m, pairs, model, tok, sae, out, training, f"{c}/{m}", f"BLEnD {c} train split", args, layer)
            for m in cmethods
        }
        merge(evaluate(model, tok, country_vectors={c: cv[c]}, parts=("culture",), **common))
    merge(evaluate(model, tok, behaviour_vectors=bv, country_vectors=cv, parts=("mmlu",), **common))
    prompts = {b: [p.prompt for p in load_pairs(bipo_csv_path(b, "test"), limit=3)] for b in bv}
    merge(evaluate(model, tok, behaviour_vectors=bv, generation_prompts=prompts, parts=("generations",), **common))


if __name__ == "__main__":
    main()
