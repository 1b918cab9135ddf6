"""Collect the main job's results on each behaviour into bench/results/main_job_behaviours.json and
print the table of docs/evaluation.md:

    for b in hallucination spanish positive-tone; do bash scripts/main.sh --behaviour $b --out runs/main-$b; done
    .venv/bin/python scripts/collect_main_runs.py [runs/main-hallucination runs/main-spanish ...]
"""

import json
import sys
from pathlib import Path

BEHAVIOURS = ("hallucination", "spanish", "positive-tone")
OUT = Path("bench/results/main_job_behaviours.json")


def summary(results: dict, behaviour: str) -> dict:
    training = {
        name: {
            "steps": t.get("steps"),
            "lr": t.get("lr"),
            "support": t.get("support"),
            "final_loss": t["losses"][-1]["loss"] if t.get("losses") else None,
            "nnz": t["losses"][-1]["nnz"] if t.get("losses") else None,
            "seconds": t.get("seconds"),
        }
        for name, t in results["training"].items()
    }
    generation = results["scored_generations"][behaviour]
    margin = dict(results["margin"][behaviour])
    margin["data"] = margin["data"][margin["data"].find("yapo_fast/") :]  # relative to the checkout
    return {
        "command": f"bash scripts/main.sh --behaviour {behaviour}",
        "main_job": results["meta"]["main_job"],
        "training": training,
        "margin": margin,
        "generation": {k: generation[k] for k in ("rule", "unsteered_rate", "effects")},
        "mmlu": {k: results["mmlu"][k] for k in ("n", "change", "change_ci95") if k in results.get("mmlu", {})},
    }


def cell(e: dict) -> str:
    """effect ± CI half-width, * where the paired 95% CI excludes 0."""
    star = "*" if e["delta_ci_low"] > 0 or e["delta_ci_high"] < 0 else ""
    return f"{e['delta']:+.2f} ± {(e['delta_ci_high'] - e['delta_ci_low']) / 2:.2f}{star}"


def table(collected: dict) -> list[str]:
    lines = [
        "| behaviour (scorer; unsteered) | method | final loss | margin m=-1 | margin m=+1 | generation m=-1 | generation m=+1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for behaviour, s in collected.items():
        first = True
        for name, (lo, hi) in s["margin"]["effects"].items():
            g_lo, g_hi = s["generation"]["effects"][name]
            loss = s["training"][name]["final_loss"]
            head = f"{behaviour} ({s['generation']['unsteered_rate']:.2f})" if first else ""
            lines.append(
                f"| {head} | {name} | {'-' if loss is None else f'{loss:.3f}'} | {cell(lo)} | {cell(hi)} | "
                f"{cell(g_lo)} | {cell(g_hi)} |"
            )
            first = False
    return lines


if __name__ == "__main__":
    dirs = [Path(a) for a in sys.argv[1:]] or [Path(f"runs/main-{b}") for b in BEHAVIOURS]
    collected = {}
    for d in dirs:
        results = json.loads((d / "results.json").read_text())
        behaviour = results["meta"]["main_job"]["behaviour"]
        collected[behaviour] = summary(results, behaviour)
    OUT.write_text(json.dumps(collected, indent=1))
    print("\n".join(table(collected)))
