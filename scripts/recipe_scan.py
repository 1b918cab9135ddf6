"""Choose the main job's recipe by measurement: YaPO and BiPO on the same pairs, training loss per step
and the held-out preference margin (eval_margin.py) after every epoch, at m = -1 and m = +1, for a few
learning rates, plus the reference schedule (lr 5e-4, 100 warm-up steps).

    .venv/bin/python scripts/recipe_scan.py [behaviour] [out.json]

Defaults: hallucination, 64 training pairs, batch 4, 4 epochs (64 steps), 10% warm-up, the shipped
SAE (layer 15; the only layer with a shipped SAE, so the layer is not scanned), margin on the first
24 test pairs. Writes JSON (resumable: finished runs are kept) and a PNG beside it.
"""

import json
import sys
import time
from pathlib import Path

RUNS = [  # (method, lr, warm-up steps)
    *((m, lr, None) for lr in (5e-3, 2e-2, 5e-2) for m in ("yapo", "bipo")),
    ("yapo", 5e-4, 100),
    ("bipo", 5e-4, 100),
]
PAIRS, EPOCHS, BATCH, HELDOUT = 64, 4, 4, 24


def run(behaviour: str, out: Path) -> dict:
    import yapo_fast as yf
    from yapo_fast.atomic import write_text_atomic
    from yapo_fast.data.pairs import behaviour_path, load_pairs
    from yapo_fast.eval.margin import margin_effects

    model, tok = yf.load_model()
    sae = yf.load_sae()
    train_pairs = load_pairs(behaviour_path(behaviour), limit=PAIRS)
    test_pairs = load_pairs(behaviour_path(behaviour, "test"), limit=HELDOUT)
    results = json.loads(out.read_text()) if out.exists() else {"behaviour": behaviour, "runs": {}}
    steps = -(-PAIRS // BATCH) * EPOCHS
    for method, lr, warm in RUNS:
        key = f"{method} lr={lr:g}" + ("" if warm is None else f" warmup={warm}")
        if key in results["runs"]:
            continue
        warm_steps = max(1, steps // 10) if warm is None else warm
        vec_path = out.parent / "recipe_vectors" / f"{method}-{lr:g}-{warm_steps}.safetensors"
        t0 = time.perf_counter()
        res = yf.train(
            method,
            train_pairs,
            model=model,
            tokenizer=tok,
            sae=sae if method == "yapo" else None,
            layer=sae.layer,
            epochs=EPOCHS,
            batch_size=BATCH,
            lr=lr,
            warmup_steps=warm_steps,
            seed=0,
            out=vec_path,
            resume=False,
            progress=False,
        )
        seconds = time.perf_counter() - t0
        margins = []
        for epoch in range(1, EPOCHS + 1):
            vec = yf.load_vector(vec_path.with_name(f"{vec_path.stem}.epoch{epoch}.safetensors"))
            effects, _ = margin_effects(model, tok, test_pairs, {"v": vec}, sae=sae, progress=False)
            margins.append({"step": epoch * steps // EPOCHS, **{f"m={e['multiplier']:+g}": e for e in effects["v"]}})
        results["runs"][key] = {
            "method": method,
            "lr": lr,
            "warmup_steps": warm_steps,
            "train_seconds": seconds,
            "losses": [r["loss"] for r in res.losses],
            "margins": margins,
        }
        write_text_atomic(out, json.dumps(results, indent=1))
        print(
            key,
            f"{seconds:.0f} s",
            [round(m["m=+1"]["delta"], 2) for m in margins],
            [round(m["m=-1"]["delta"], 2) for m in margins],
            flush=True,
        )
    return results


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, r in results["runs"].items():
        style = "-" if r["method"] == "yapo" else "--"
        a.plot(range(1, len(r["losses"]) + 1), r["losses"], style, lw=1, label=key)
        spread = [m["m=+1"]["delta"] - m["m=-1"]["delta"] for m in r["margins"]]
        b.plot([m["step"] for m in r["margins"]], spread, style + "o", lw=1, label=key)
    a.axhline(0.6931, color="grey", ls=":", lw=0.8)
    a.set(xlabel="step", ylabel="bi-directional DPO loss", title="training loss")
    b.set(
        xlabel="step",
        ylabel="margin effect m=+1 minus m=-1 [nats]",
        title=f"held-out margin ({HELDOUT} test pairs of {results['behaviour']})",
    )
    b.legend(fontsize=7)
    fig.savefig(png, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    behaviour = sys.argv[1] if len(sys.argv) > 1 else "hallucination"
    out = Path(sys.argv[2] if len(sys.argv) > 2 else f"bench/results/recipe_scan_{behaviour}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(run(behaviour, out), out.with_suffix(".png"))
