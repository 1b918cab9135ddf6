"""Time to quality: seconds of training until a vector steers its behaviour on held-out pairs as far
as the paper's reference schedule gets it, for the lean trainer (yapo_fast.train's Trainer) against
the naive one (tests/naive_trainer.py: a full forward of both responses per step), with the
project's recipe (the main job's learning rate) beside them.

    YAPO_BENCH_THREADS=1 .venv/bin/pytest bench/bench_time_to_quality.py -s -p no:cacheprovider

Quality of a vector: the held-out preference-margin effect in both directions, Q = (effect at m=+1 -
effect at m=-1) / 2 (nats; yapo_fast.eval.margin), on the first YAPO_TTQ_HELDOUT test pairs of the
behaviour. The reference schedule (lr 5e-4, 100 warm-up steps, cosine, YAPO_TTQ_EPOCHS epochs over
YAPO_TTQ_PAIRS training pairs, batch 4) defines the target Q_ref. Both trainers run that schedule step
by step in turn (same machine load for both; the two are exact, so they reach Q_ref at the same step,
its last); the main job's YaPO recipe (a support budget of 256 latents at lr 0.2, 10% warm-up: its
defaults) runs with Q measured every YAPO_TTQ_EVERY steps until Q >= Q_ref. Seconds are training seconds (cache pass included, evaluations excluded).
Results: bench/results/time_to_quality.json and .md.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from naive_trainer import NaiveTrainer  # noqa: E402

BEHAVIOUR = os.environ.get("YAPO_TTQ_BEHAVIOUR", "hallucination")
PAIRS = int(os.environ.get("YAPO_TTQ_PAIRS", "64"))
EPOCHS = int(os.environ.get("YAPO_TTQ_EPOCHS", "2"))
HELDOUT = int(os.environ.get("YAPO_TTQ_HELDOUT", "24"))
EVERY = int(os.environ.get("YAPO_TTQ_EVERY", "2"))
BATCH = 4
REFERENCE = dict(lr=5e-4, warmup_steps=100)
RESULTS = Path(__file__).parent / "results"
if os.environ.get("YAPO_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["YAPO_BENCH_THREADS"]))


def setup():
    import yapo_fast as yf
    from yapo_fast.data.pairs import behaviour_path, load_pairs

    model, tok = yf.load_model()
    sae = yf.load_sae()
    pairs = load_pairs(behaviour_path(BEHAVIOUR), limit=PAIRS)
    test = load_pairs(behaviour_path(BEHAVIOUR, "test"), limit=HELDOUT)
    return model, tok, sae, pairs, test


def quality(model, tok, sae, test, vector, base) -> dict:
    from yapo_fast.eval.margin import margin_effects

    effects, _ = margin_effects(model, tok, test, {"v": vector}, sae=sae, progress=False, base=base)
    lo, hi = (e["delta"] for e in effects["v"])
    return {"q": (hi - lo) / 2, "m=-1": lo, "m=+1": hi}


def trainer(model, tok, sae, pairs, **settings):
    from yapo_fast.train import TrainConfig, Trainer

    cfg = TrainConfig.of("yapo", layer=sae.layer, epochs=EPOCHS, batch_size=BATCH, seed=0, **settings)
    return Trainer(cfg, pairs, model=model, tokenizer=tok, sae=sae, progress=False)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def reference_paired(model, tok, sae, pairs) -> dict:
    """The reference schedule, lean and naive step by step in turn."""
    from yapo_fast.train import make_optimizer

    lean = trainer(model, tok, sae, pairs, **REFERENCE)
    _, lean_s = timed(lean.build_cache)
    naive = NaiveTrainer("yapo", model, tok, pairs, sae.layer, sae=sae)
    v = torch.zeros(sae.d_sae, requires_grad=True)
    opt, sched = make_optimizer(v, lean.cfg, lean.total)
    naive_s = 0.0
    for _, batch, d in lean.schedule:
        naive_s += timed(lambda: naive.step(batch, v, d, opt, sched, lean.cfg.grad_clip))[1]
        lean_s += timed(lean.step)[1]
    return {
        "lean": lean,
        "lean_seconds": lean_s,
        "naive_seconds": naive_s,
        "steps": lean.total,
        "max_abs_diff_v": float((lean.v.detach() - v.detach()).abs().max()),
    }


def main_job_recipe() -> dict:
    """The main job's YaPO recipe (its defaults: the support budget and its learning rate)."""
    from yapo_fast.main_job import DEFAULTS

    return (
        {"lr": DEFAULTS["sparse_lr"], "support": DEFAULTS["support"]} if DEFAULTS["support"] else {"lr": DEFAULTS["lr"]}
    )


def recipe_to(model, tok, sae, pairs, test, base, target: float) -> dict:
    steps = -(-len(pairs) // BATCH) * EPOCHS
    run = trainer(model, tok, sae, pairs, warmup_steps=max(1, steps // 10), **main_job_recipe())
    _, seconds = timed(run.build_cache)
    curve = []
    while not run.done:
        seconds += timed(run.step)[1]
        if run.next_step % EVERY == 0 or run.done:
            q = quality(model, tok, sae, test, run.vector(), base)
            curve.append({"step": run.next_step, "seconds": seconds, **q})
            if q["q"] >= target:
                return {"reached": True, "steps": run.next_step, "seconds": seconds, "curve": curve}
    return {"reached": False, "steps": run.next_step, "seconds": seconds, "curve": curve}


def test_time_to_reference_quality(benchmark):
    from yapo_fast.atomic import write_text_atomic
    from yapo_fast.eval.margin import pair_margins

    model, tok, sae, pairs, test = setup()
    base = pair_margins(model, tok, test)
    ref = benchmark.pedantic(reference_paired, args=(model, tok, sae, pairs), rounds=1, iterations=1)
    q_ref = quality(model, tok, sae, test, ref.pop("lean").vector(), base)
    recipe_name = ", ".join(f"{k} {v:g}" for k, v in main_job_recipe().items())
    recipe = recipe_to(model, tok, sae, pairs, test, base, q_ref["q"])
    out = {
        "behaviour": BEHAVIOUR,
        "pairs": len(pairs),
        "heldout_pairs": len(test),
        "epochs": EPOCHS,
        "reference_schedule": REFERENCE,
        "reference_quality": q_ref,
        **ref,
        "lean_over_naive_speedup": ref["naive_seconds"] / ref["lean_seconds"],
        "recipe": {**recipe, "settings": recipe_name},
        "recipe_over_naive_speedup": ref["naive_seconds"] / recipe["seconds"] if recipe["reached"] else None,
        "threads": torch.get_num_threads(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / "time_to_quality.json", json.dumps(out, indent=1))
    rows = [
        ("naive trainer, reference schedule", ref["naive_seconds"], ref["steps"], 1.0),
        ("lean trainer, reference schedule", ref["lean_seconds"], ref["steps"], out["lean_over_naive_speedup"]),
        (
            f"lean trainer, main job recipe ({recipe_name})",
            recipe["seconds"],
            recipe["steps"],
            out["recipe_over_naive_speedup"],
        ),
    ]
    md = [
        f"# Time to the reference schedule's held-out quality ({BEHAVIOUR}, {len(pairs)} pairs, {EPOCHS} epochs)",
        "",
        f"Target: Q_ref = {q_ref['q']:.3f} nats (held-out margin effect {q_ref['m=-1']:+.3f} at m=-1, "
        f"{q_ref['m=+1']:+.3f} at m=+1, first {len(test)} test pairs), reached by the reference schedule "
        f"(lr 5e-4, 100 warm-up steps) after its {ref['steps']} steps. Lean and naive v differ by at most "
        f"{ref['max_abs_diff_v']:.2e}.",
        "",
        "| run | seconds to Q_ref | steps | speed-up over naive |",
        "|---|---|---|---|",
        *(
            f"| {name} | {s:.1f} | {n} | {'-' if r is None else f'{r:.2f}x'} |"
            + ("" if name.startswith(("naive", "lean trainer, ref")) or recipe["reached"] else " (not reached)")
            for name, s, n, r in rows
        ),
        "",
        f"`YAPO_BENCH_THREADS={torch.get_num_threads()} .venv/bin/pytest bench/bench_time_to_quality.py -s -p no:cacheprovider`",
    ]
    write_text_atomic(RESULTS / "time_to_quality.md", "\n".join(md) + "\n")
    print("\n".join(md))
    assert ref["max_abs_diff_v"] < 1e-4  # the two trainers are the same computation
