"""`yapo-fast eval`, `yapo-fast data` and `yapo-fast main` (the main job lives in main_job.py)."""

from __future__ import annotations

from pathlib import Path

from yapo_fast.errors import YapoFastError


def _named(values, what):
    """['key=path', ...] -> {key: [path, ...]} (a key may repeat)."""
    out: dict[str, list[str]] = {}
    for v in values or []:
        if "=" not in v:
            raise YapoFastError(f"--{what} expects KEY=PATH (e.g. hallucination=runs/yapo.safetensors), got {v!r}")
        key, path = v.split("=", 1)
        out.setdefault(key.strip(), []).append(path.strip())
    return out


def _load_vectors(spec, what, model_ident, sae_source):
    from yapo_fast.vector import load_vector

    groups = {}
    for key, paths in _named(spec, what).items():
        group = {}
        for path in paths:
            vec = load_vector(path)
            name = vec.method if vec.method not in group else Path(path).stem
            group[name] = vec
        groups[key] = group
    return groups


def cmd_eval(args) -> None:
    from yapo_fast.eval.evaluate import MULTIPLIERS, evaluate
    from yapo_fast.eval.report import write_report
    from yapo_fast.model import load_model, model_identity
    from yapo_fast.sae.autoencoder import load_sae

    model, tok = load_model(args.model)
    bv = _load_vectors(args.vector, "vector", model_identity(model), args.sae)
    cv = _load_vectors(args.country_vector, "country-vector", model_identity(model), args.sae)
    if not bv and not cv:
        raise YapoFastError("nothing to evaluate: give --vector BEHAVIOUR=PATH and/or --country-vector COUNTRY=PATH")
    needs_sae = any(v.is_sparse for g in (*bv.values(), *cv.values()) for v in g.values())
    sae = load_sae(args.sae) if needs_sae else None
    mults = MULTIPLIERS if not args.multipliers else tuple(float(x) for x in args.multipliers.split(","))
    prompts = None
    if args.generate:
        from yapo_fast.data.pairs import behaviour_path, load_pairs

        prompts = {b: [p.prompt for p in load_pairs(behaviour_path(b, "test"), limit=args.generate)] for b in bv}
    results = evaluate(
        model,
        tok,
        sae=sae,
        behaviour_vectors=bv,
        country_vectors=cv,
        multipliers=mults,
        ab_limit=args.ab_items or None,
        mcq_limit=args.mcq_items or None,
        culture_multiplier=args.culture_multiplier,
        mmlu=not args.no_mmlu,
        mmlu_per_subject=args.mmlu_per_subject or None,
        mmlu_shots=args.mmlu_shots,
        mmlu_multiplier=args.mmlu_multiplier,
        generation_prompts=prompts,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    paths = write_report(results, args.out)
    print(f"report: {paths['markdown']}\nresults: {paths['json']}")
    for p in paths["plots"]:
        print(f"plot: {p}")


def cmd_data(args) -> None:
    from yapo_fast.data import blend

    if args.blend_raw:
        path = blend.build_digest(args.blend_raw)
        print(f"wrote {path}")
    digest = blend.load_digest()
    names = blend.countries(digest) if args.countries == "all" else [c.strip() for c in args.countries.split(",")]
    for country in names:
        for path in blend.build_country_files(country, args.out, seed=args.seed, digest=digest):
            n = sum(1 for _ in open(path, encoding="utf-8"))
            print(f"wrote {path} ({n} rows)")


def register(sub) -> None:
    from yapo_fast.main_job import register_main

    p = sub.add_parser("eval", help="steering curves, cultural MCQ and MMLU for steering vectors; report + plots")
    p.add_argument("--model", default=None, help="transformers model path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--sae", default=None, help="SAE directory (sae-lens format) for yapo vectors (default: shipped)")
    p.add_argument("--vector", action="append", help="BEHAVIOUR=PATH: A/B steering curve on bipo/<BEHAVIOUR> (repeat)")
    p.add_argument("--country-vector", action="append", help="COUNTRY=PATH: BLEnD MCQ for the country (repeat)")
    p.add_argument(
        "--multipliers", default=None, help="comma-separated, e.g. --multipliers=-1,0,1 (default -2,-1,-0.5,0,0.5,1,2)"
    )
    p.add_argument("--ab-items", type=int, default=0, help="first N A/B items (0: all)")
    p.add_argument("--mcq-items", type=int, default=0, help="first N BLEnD items per setting (0: all)")
    p.add_argument("--culture-multiplier", type=float, default=1.0)
    p.add_argument(
        "--mmlu-per-subject", type=int, default=0, help="first N per subject of the shipped subset (0: all 20)"
    )
    p.add_argument("--mmlu-shots", type=int, default=2)
    p.add_argument("--mmlu-multiplier", type=float, default=1.0)
    p.add_argument("--no-mmlu", action="store_true")
    p.add_argument("--generate", type=int, default=0, help="also generate for N test prompts per behaviour")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="runs/eval")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="build BLEnD cultural preference pairs and MCQ items (JSONL) per country")
    p.add_argument("--countries", default="Spain,China", help="comma-separated, or 'all'")
    p.add_argument("--blend-raw", default=None, help="BLEnD's data folder: rebuild the shipped digest from it first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="data/blend")
    p.set_defaults(func=cmd_data)

    register_main(sub)
