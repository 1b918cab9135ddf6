"""`yapo-fast explain VECTOR [VECTOR ...]`: which SAE features a steering vector moves and what they
mean, written as report.html (self-contained), report.md and report.json. With several vectors
(e.g. YaPO, BiPO and CAA for one behaviour), one report each plus compare.{html,md,json}."""

from __future__ import annotations

from pathlib import Path


def _print_summary(report: dict) -> None:
    v = report["vector"]
    print(f"{v['method']} vector, layer {v['layer']}, multiplier {v['multiplier']:g}")
    if "ranking" in report:
        k = report["ranking"]
        print(
            f"{v['nnz']} entries ({k['n_add']} add, {k['n_cap']} cap); share of the delta-norm bound: "
            f"top 10 {k['share_top10']:.1%}, top 50 {k['share_top50']:.1%}"
        )
    if "projection" in report:
        p = report["projection"]
        print(f"SAE features for 50% / 90% of its squared norm: {p['features_for_50']} / {p['features_for_90']}")
    for c in report["features"][:5]:
        lens = " ".join(repr(x["token"]) for x in c.get("logit_lens", {}).get("top", [])[:5])
        print(f"  #{c['rank']} latent {c['latent']} ({c['role']}): promotes {lens}")
    for path in report["files"].values():
        print(f"wrote {path}")


def cmd_explain(args) -> None:
    from yapo_fast.explain import explain
    from yapo_fast.explain.compare import compare, write_compare
    from yapo_fast.model import load_model
    from yapo_fast.sae.autoencoder import load_sae

    vectors = [Path(v) for v in args.vector]
    model, tokenizer = load_model(args.model)  # loaded once for every vector
    sae = load_sae(args.sae)
    if len(vectors) == 1:
        outs = [Path(args.out) if args.out else vectors[0].parent / f"{vectors[0].stem}-explain"]
    else:
        root = Path(args.out) if args.out else vectors[0].parent / "explain-compare"
        outs = [root / v.stem for v in vectors]
    reports = {}
    for vector, out in zip(vectors, outs):
        reports[vector.stem] = explain(
            vector,
            model=model,
            tokenizer=tokenizer,
            sae=sae,
            multiplier=args.multiplier,
            top=args.top,
            contexts=args.contexts,
            data=args.data,
            data_pairs=args.data_pairs,
            index_tokens=args.index_tokens,
            cache=args.cache,
            out=out,
        )
        _print_summary(reports[vector.stem])
    if len(vectors) > 1:
        for path in write_compare(compare(reports), root).values():
            print(f"wrote {path}")


def register(sub) -> None:
    p = sub.add_parser("explain", help="explain steering vectors in SAE features (HTML, Markdown, JSON report)")
    p.add_argument("vector", nargs="+", help="steering vector(s) (.safetensors); several are also compared")
    p.add_argument(
        "--model", default=None, help="transformers model id or path (default: embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument("--sae", default=None, help="SAE directory in sae-lens format (default: the shipped SAE)")
    p.add_argument(
        "--out",
        default=None,
        help="report folder (default: <vector stem>-explain beside the vector; explain-compare/ for several)",
    )
    p.add_argument("--multiplier", type=float, default=None, help="default: the vector's own")
    p.add_argument("--top", type=int, default=12, help="feature cards to show")
    p.add_argument("--contexts", type=int, default=6, help="top-activating contexts per card")
    p.add_argument("--data", default=None, help="training pairs (BiPO CSV / JSONL); default: the vector's info['data']")
    p.add_argument("--data-pairs", type=int, default=32, help="pairs used for the chosen/rejected statistics")
    p.add_argument("--index-tokens", type=int, default=32768, help="corpus tokens in the activation index")
    p.add_argument("--cache", default=None, help="activation index folder (default: $YAPO_FAST_CACHE/activation-index)")
    p.set_defaults(func=cmd_explain)
