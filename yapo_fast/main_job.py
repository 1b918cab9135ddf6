"""The main job (`yapo-fast main`, README command 1): on the embedded default model and its shipped
SAE, train YaPO, BiPO and CAA vectors for one behaviour, evaluate them against no steering
(A/B steering curves, MMLU subset), generate a batch with and without the vector, write the
report and plots, and print a short table.

Sizes are options; the defaults are sized for about 10 minutes on 2 CPU cores. Because a default
run has only a few dozen optimizer steps, it uses a much larger learning rate than the reference
(2e-2 vs 5e-4) and a warm-up of 10% of the steps (the reference's 100 warm-up steps would be more
than the whole run); `--lr` and `--warmup-steps` set them. Why: AdamW moves each entry of v by
about lr per step, so after T steps |v_i| <= lr*T. At lr 5e-3 and 32 steps (the previous default)
the BiPO vector had norm ~1 against a residual-stream norm of ~170 at layer 15 and the YaPO entries
were ~0.01 against feature activations of ~1: both too small to move the model. At 2e-2 (and 48
steps) BiPO reaches norm ~7 and the DPO loss falls from 0.69 to ~0.35 (README, evaluation).
"""

from __future__ import annotations

import time
from pathlib import Path

from yapo_fast.errors import YapoFastError

DEFAULTS = dict(
    behaviour="hallucination",
    pairs=64,
    epochs=2,
    batch_size=4,
    lr=2e-2,
    warmup_steps=None,
    # YaPO with a support budget of 256 latents (top-k projection after every step) at 10x the
    # learning rate: its k entries must carry the edit a dense vector spreads over ~4500, and AdamW
    # moves each entry by about lr per step (docs/training.md, sparse vectors: at k = 256 and lr 0.2
    # the held-out margin effect is >= 90% of the dense vector's, both ways, on two behaviours)
    support=256,
    sparse_lr=0.2,
    heldout=40,
    gen_prompts=48,
    ab_items=0,
    mmlu_per_subject=4,
    mmlu_shots=1,
    prompts=4,
    max_new_tokens=32,
    multiplier=1.0,
    methods=("yapo", "bipo", "caa"),
    out="runs/main",
    seed=0,
)


def _resolve_sae(sae, model):
    """The shipped SAE for the default model; an explicit SAE or sae-lens directory otherwise."""
    from yapo_fast.sae.autoencoder import SAE, load_sae

    if isinstance(sae, SAE):
        return sae
    return load_sae(sae)


def _timed_generate(model, tok, prompts, vector, multiplier, sae, max_new_tokens, generate_fn):
    """Texts and tokens/s of a greedy batch (tokens counted with the model's tokenizer)."""
    from yapo_fast.eval.evaluate import generate

    t0 = time.perf_counter()
    texts = generate(
        model, tok, prompts, vector, multiplier, sae=sae, max_new_tokens=max_new_tokens, generate_fn=generate_fn
    )
    total = time.perf_counter() - t0
    # tokens/s of the generation itself; the vLLM path reports it without patch()'s one-time set-up
    seconds = getattr(generate_fn, "last_generate_seconds", None) or total
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return texts, {
        "seconds": seconds,
        "setup_seconds": total - seconds,
        "tokens": n_tokens,
        "tokens_per_s": n_tokens / max(seconds, 1e-9),
    }


def vllm_generate_fn(model_path, tokenizer, sae, print_fn=print):
    """generate_fn through vLLM (eval_vllm.py), or None with the reason printed when it cannot start."""
    from yapo_fast.eval.vllm import make_vllm_generate_fn, vllm_available

    if not vllm_available():
        print_fn("vLLM is not importable here: generating through transformers")
        return None, "vLLM not importable"
    try:
        return make_vllm_generate_fn(model_path, tokenizer, sae), None
    except Exception as exc:  # an engine that cannot start must not lose the rest of the run
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        print_fn(f"vLLM engine did not start ({reason}): generating through transformers")
        return None, reason


def run_main(
    *,
    model=None,
    tokenizer=None,
    sae=None,
    behaviour: str = DEFAULTS["behaviour"],
    pairs: int = DEFAULTS["pairs"],
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    warmup_steps: int | None = None,
    support: int | None = DEFAULTS["support"],
    sparse_lr: float = DEFAULTS["sparse_lr"],
    heldout: int = DEFAULTS["heldout"],
    gen_prompts: int = DEFAULTS["gen_prompts"],
    ab_items: int | None = DEFAULTS["ab_items"],
    mmlu_per_subject: int | None = DEFAULTS["mmlu_per_subject"],
    mmlu_shots: int = DEFAULTS["mmlu_shots"],
    prompts: int = DEFAULTS["prompts"],
    max_new_tokens: int = DEFAULTS["max_new_tokens"],
    multiplier: float = DEFAULTS["multiplier"],
    multipliers=None,
    methods=DEFAULTS["methods"],
    out: str | Path = DEFAULTS["out"],
    seed: int = 0,
    layer: int = 15,
    use_vllm: bool = True,
    progress: bool = True,
    print_fn=print,
) -> dict:
    """Run the main job; returns the results dict (also written to <out>/results.json)."""
    from yapo_fast.data.pairs import BEHAVIOURS, behaviour_path, load_pairs
    from yapo_fast.eval.evaluate import MULTIPLIERS, evaluate
    from yapo_fast.eval.generation import SCORERS, scored_generations
    from yapo_fast.eval.margin import margin_effects
    from yapo_fast.eval.report import write_report
    from yapo_fast.model import load_model
    from yapo_fast.train import train

    t_start = time.perf_counter()
    out = Path(out)
    model_path = None
    if isinstance(model, (str, Path)) or model is None:
        model_path = model
        model, tokenizer = load_model(model)
    elif tokenizer is None:
        raise YapoFastError("pass the tokenizer with the model")
    if sae is None:
        try:
            sae = _resolve_sae(None, model)
        except YapoFastError as exc:  # no SAE shipped in this install: the dense methods still run
            if "no default SAE is shipped" not in str(exc):
                raise
            print_fn(f"no shipped SAE ({exc}); YaPO is skipped, BiPO and CAA steer layer {layer}")
            methods = tuple(m for m in methods if m != "yapo")
    else:
        sae = _resolve_sae(sae, model)
    if sae is not None:
        if sae.layer is None:
            raise YapoFastError(f"SAE {sae.name!r} does not record its layer; pass an SAE whose cfg names its hook")
        layer = sae.layer
    if not methods:
        raise YapoFastError("no method left to train: give --methods (yapo needs an SAE)")
    data = behaviour_path(behaviour)
    train_pairs = load_pairs(data, limit=pairs)
    steps = -(-len(train_pairs) // batch_size) * epochs
    warm = max(1, steps // 10) if warmup_steps is None else warmup_steps

    vectors, training = {}, {}
    for method in methods:
        sparse = method == "yapo" and bool(support)
        res = train(
            method,
            train_pairs,
            model=model,
            tokenizer=tokenizer,
            sae=sae if method == "yapo" else None,
            layer=layer,
            epochs=epochs,
            batch_size=batch_size,
            lr=sparse_lr if sparse else lr,
            warmup_steps=warm,
            seed=seed,
            out=out / "vectors" / f"{method}-{behaviour}-L{layer}.safetensors",
            resume=False,
            multiplier=multiplier,
            progress=progress,
            **({"support": support} if sparse else {}),
        )
        vectors[method] = res.vector
        training[method] = {
            "seconds": res.seconds,
            "cache_seconds": res.cache_seconds,
            "steps": res.steps,
            "pairs": len(train_pairs),
            "data": str(data),
            "losses": res.losses,
            "vector": str(res.out) if res.out else None,
            "lr": sparse_lr if sparse else lr,
            "warmup_steps": warm,
            **({"support": support} if sparse else {}),
        }

    # Held-out items of the trained behaviour: the first `heldout` test pairs for the margin, the
    # next `gen_prompts` test prompts for scored generation (none of them seen in training).
    test_pairs = load_pairs(behaviour_path(behaviour, "test"), limit=heldout + gen_prompts)
    margin_pairs, gen_questions = test_pairs[:heldout], [p.prompt for p in test_pairs[heldout:]]
    ab_multipliers = MULTIPLIERS if multipliers is None else multipliers
    results = evaluate(
        model,
        tokenizer,
        sae=sae,
        behaviour_vectors={behaviour: vectors},
        multipliers=ab_multipliers,
        ab_limit=ab_items,
        # added behaviours have no A/B file: their vector's scale is read on their own test prompts
        ab_files=None if behaviour in BEHAVIOURS else {behaviour: behaviour_path(behaviour, "test")},
        mmlu_per_subject=mmlu_per_subject,
        mmlu_shots=mmlu_shots,
        mmlu_multiplier=multiplier,
        progress=progress,
        parts=("scale", "mmlu") + (("ab",) if ab_items else ()),
    )
    if not ab_items:
        results["ab_skipped"] = {
            behaviour: "not run by default: the default model barely reads A/B options "
            "(P(matching) ~0.5 unsteered); --ab-items N runs it"
        }
    results["training"] = training
    both_ways = (-multiplier, multiplier)
    effects, base = margin_effects(
        model,
        tokenizer,
        margin_pairs,
        vectors,
        multipliers=both_ways,
        sae=sae,
        progress=progress,
        desc=f"{behaviour} margin",
    )
    results["margin"] = {
        behaviour: {
            "data": str(behaviour_path(behaviour, "test")),
            "n": len(margin_pairs),
            "unsteered_mean": float(base.mean()),
            "effects": effects,
        }
    }

    # Greedy answers to held-out prompts, unsteered and steered both ways (vLLM when its integration
    # is there), scored by the behaviour's scorer; the first `prompts` also through transformers.
    generate_fn, vllm_error = None, "disabled (--no-vllm)"
    if use_vllm:
        from yapo_fast.model import resolve_model_path

        path = model_path if model_path is not None else getattr(model.config, "_name_or_path", None)
        generate_fn, vllm_error = vllm_generate_fn(resolve_model_path(path), tokenizer, sae, print_fn)
    throughput, hf_throughput, same_text = {}, {}, {}

    def gen(qs, vec, m):
        key = "unsteered" if vec is None else f"{vec.method} m={m:+g}"
        texts, throughput[key] = _timed_generate(model, tokenizer, qs, vec, m, sae, max_new_tokens, generate_fn)
        if (
            generate_fn is not None and prompts
        ):  # the same prompts through transformers: a cross-check and the speed baseline
            hf_texts, hf_throughput[key] = _timed_generate(
                model, tokenizer, qs[:prompts], vec, m, sae, max_new_tokens, None
            )
            same_text[key] = sum(a == b for a, b in zip(texts, hf_texts)) / len(hf_texts)
        return texts

    if gen_questions and behaviour not in SCORERS:
        results["scored_generations_skipped"] = {
            behaviour: f"no generation scorer for {behaviour!r} (scored: {sorted(SCORERS)})"
        }
    elif gen_questions:
        scored = scored_generations(gen_questions, vectors, gen, behaviour, multipliers=both_ways)
        results["scored_generations"] = {behaviour: scored}
    results["throughput"] = {
        "engine": "vllm" if generate_fn else "transformers",
        "vllm_error": vllm_error,
        **throughput,
    }
    if generate_fn is not None:
        results["throughput"]["transformers"] = hf_throughput
        results["throughput"]["same_text_as_transformers"] = same_text
    results["meta"]["main_job"] = {
        "behaviour": behaviour,
        "pairs": len(train_pairs),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warm,
        "support": support,
        "sparse_lr": sparse_lr if support else None,
        "layer": layer,
        "multiplier": multiplier,
        "seconds": time.perf_counter() - t_start,
    }
    if (
        "yapo" in vectors and sae is not None
    ):  # which SAE features the trained vector moves (yapo-fast explain), linked below
        from yapo_fast.explain import explain

        explained = explain(
            vectors["yapo"],
            model=model,
            tokenizer=tokenizer,
            sae=sae,
            data=data,
            data_pairs=16,
            index_tokens=16384,
            out=out / "explain-yapo",
            progress=progress,
        )
        results["explain"] = {"yapo": explained["files"]}
    paths = write_report(results, out)
    results["paths"] = {
        "json": str(paths["json"]),
        "markdown": str(paths["markdown"]),
        "plots": [str(p) for p in paths["plots"]],
    }
    print_fn(summary_table(results, behaviour, multiplier))
    print_fn(f"report: {paths['markdown']}\nresults: {paths['json']}")
    if "explain" in results:
        print_fn(f"explain (yapo vector): {results['explain']['yapo']['html']}")
    for p in paths["plots"]:
        print_fn(f"plot: {p}")
    return results


def _ci(effect: dict | None, fmt: str) -> str:
    """'+x±h' with the paired 95% CI half-width; '*' marks an interval that excludes 0."""
    if not effect:
        return "-"
    half = (effect["delta_ci_high"] - effect["delta_ci_low"]) / 2
    sig = "*" if effect["delta_ci_low"] > 0 or effect["delta_ci_high"] < 0 else " "
    return f"{effect['delta']:+{fmt}}±{half:{fmt}}{sig}"


def _at(effects: list[dict], m: float) -> dict | None:
    return next((e for e in effects if e["multiplier"] == m), None)


def summary_table(results: dict, behaviour: str, multiplier: float) -> str:
    """The main job's printed story: held-out margin and scored generations both ways, then costs."""
    margin = results["margin"][behaviour]
    scored = (results.get("scored_generations") or {}).get(behaviour)
    mm = results.get("mmlu") or {"change": {}, "change_ci95": {}, "accuracy": {"unsteered": {"accuracy": float("nan")}}}
    tp = results.get("throughput", {})
    scale = results.get("scale") or {}
    m = abs(multiplier)
    lines = [
        f"{behaviour}, effects against the unsteered model on held-out items (paired 95% CI; * excludes 0):",
        f"  margin = change of log p(matching) - log p(not matching) in nats, {margin['n']} test pairs "
        f"(unsteered mean {margin['unsteered_mean']:+.2f})",
    ]
    if scored:
        n = len(scored["rows"])
        lines.append(
            f"  gen = change of the mean score of greedy answers, {n} test prompts (unsteered "
            f"{scored['unsteered_rate']:.2f}); score: {scored['rule']}"
        )
    lines.append(
        f"  MMLU = accuracy change at m=+{m:g} ({mm.get('n', 0)} items, unsteered "
        f"{mm['accuracy']['unsteered']['accuracy']:.3f}); generation via {tp.get('engine', '?')}"
    )
    head = (
        f"{'method':<7}{'margin m=-' + format(m, 'g'):>16}{'margin m=+' + format(m, 'g'):>16}"
        f"{'gen m=-' + format(m, 'g'):>14}{'gen m=+' + format(m, 'g'):>14}{'MMLU':>15}{'edit/|h|':>9}"
        f"{'train s':>8}{'tok/s':>7}"
    )
    lines.append(head)
    for name, effects in margin["effects"].items():
        gen = (scored or {}).get("effects", {}).get(name, [])
        ch = mm["change"].get(f"{behaviour}/{name}")
        ci = (mm.get("change_ci95") or {}).get(f"{behaviour}/{name}")
        mmlu = "-" if ch is None else _ci({"delta": ch, "delta_ci_low": ci[0], "delta_ci_high": ci[1]}, ".3f")
        secs = results.get("training", {}).get(name, {}).get("seconds", float("nan"))
        tps = tp.get(f"{name} m=+{m:g}", {}).get("tokens_per_s", float("nan"))
        edit = scale.get(f"{behaviour}/{name}", {}).get("edit_ratio", float("nan"))
        lines.append(
            f"{name:<7}{_ci(_at(effects, -m), '.2f'):>16}{_ci(_at(effects, m), '.2f'):>16}"
            f"{_ci(_at(gen, -m), '.2f'):>14}{_ci(_at(gen, m), '.2f'):>14}{mmlu:>15}{edit:>9.3f}"
            f"{secs:>8.1f}{tps:>7.1f}"
        )
    if tp.get("unsteered"):
        line = f"unsteered generation {tp['unsteered']['tokens_per_s']:.1f} tok/s"
        if tp.get("same_text_as_transformers"):
            same = tp["same_text_as_transformers"]
            line += (
                f"; vLLM text equal to transformers on {sum(same.values()) / len(same):.0%} of the "
                f"cross-checked answers ({len(same)} settings)"
            )
        lines.append(line)
    return "\n".join(lines)


def register_main(sub) -> None:
    """`yapo-fast main`: replaces the skeleton's main job."""
    p = sub.add_parser("main", help="the main job: train YaPO/BiPO/CAA on the embedded default, evaluate, report")
    p.add_argument("--model", default=None, help="transformers model path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--sae", default=None, help="SAE directory in sae-lens format (default: the shipped SAE)")
    p.add_argument(
        "--behaviour",
        default=DEFAULTS["behaviour"],
        help="hallucination, jailbreak, power-seeking, wealth-seeking (BiPO) or spanish, positive-tone (on-policy)",
    )
    p.add_argument("--layer", type=int, default=15, help="layer steered when no SAE is there (else the SAE's)")
    p.add_argument("--pairs", type=int, default=DEFAULTS["pairs"], help="training pairs (the first N of train.csv)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of the steps")
    p.add_argument(
        "--support",
        type=int,
        default=DEFAULTS["support"],
        help="YaPO: keep at most K non-zero latents (top-k by effect after every step; 0: dense)",
    )
    p.add_argument(
        "--sparse-lr",
        type=float,
        default=DEFAULTS["sparse_lr"],
        help="YaPO's learning rate under a support budget (--lr: every other run)",
    )
    p.add_argument(
        "--heldout",
        type=int,
        default=DEFAULTS["heldout"],
        help="held-out test pairs for the preference margin (the first N of test.csv)",
    )
    p.add_argument(
        "--gen-prompts",
        type=int,
        default=DEFAULTS["gen_prompts"],
        help="held-out test prompts generated unsteered and steered both ways, then scored (the next N)",
    )
    p.add_argument(
        "--ab-items",
        type=int,
        default=DEFAULTS["ab_items"],
        help="A/B test items for steering curves (0: not run; the default model barely reads A/B options)",
    )
    p.add_argument("--mmlu-per-subject", type=int, default=DEFAULTS["mmlu_per_subject"], help="0: all 20")
    p.add_argument("--mmlu-shots", type=int, default=DEFAULTS["mmlu_shots"])
    p.add_argument(
        "--prompts",
        type=int,
        default=DEFAULTS["prompts"],
        help="of the generated prompts, how many also go through transformers (cross-check and speed)",
    )
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"])
    p.add_argument("--multiplier", type=float, default=DEFAULTS["multiplier"])
    p.add_argument("--methods", default=",".join(DEFAULTS["methods"]))
    p.add_argument("--no-vllm", action="store_true", help="generate through transformers even if vLLM is there")
    p.add_argument("--out", default=DEFAULTS["out"])
    p.set_defaults(func=cmd_main)


def cmd_main(args) -> None:
    run_main(
        model=args.model,
        sae=args.sae,
        behaviour=args.behaviour,
        layer=args.layer,
        pairs=args.pairs,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        support=args.support or None,
        sparse_lr=args.sparse_lr,
        heldout=args.heldout,
        gen_prompts=args.gen_prompts,
        ab_items=args.ab_items or None,
        mmlu_per_subject=args.mmlu_per_subject or None,
        mmlu_shots=args.mmlu_shots,
        prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        multiplier=args.multiplier,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        out=args.out,
        use_vllm=not args.no_vllm,
    )
