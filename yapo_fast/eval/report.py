"""Evaluation results as files: results.json, report.md and PNG plots (matplotlib).

Plots: steering curves with 95% confidence bands (one per behaviour), cultural accuracy bars per
country (localized / non-localized, unsteered / each vector), MMLU before/after, training loss
curves. Every figure's footer names the model, SAE, layer(s), vector(s) and data.
"""

from __future__ import annotations

import json
from pathlib import Path

from yapo_fast.atomic import atomic_path, write_text_atomic


def _footer(results: dict, vectors: list[str] | None = None, data: str | None = None) -> str:
    meta = results.get("meta", {})
    sae = meta.get("sae") or {}
    vmeta = meta.get("vectors", {})
    names = vectors if vectors is not None else list(vmeta)
    layers = sorted({str(vmeta[n]["layer"]) for n in names if n in vmeta}) or [str(sae.get("layer"))]
    sae_txt = (
        f"{sae.get('name')} ({sae.get('kind')}, d_sae={sae.get('d_sae')}, weights {sae.get('hash')})" if sae else "none"
    )
    text = (
        f"model: {meta.get('model')} | SAE: {sae_txt} | layer: {', '.join(layers)}\n"
        f"vectors: {', '.join(names) if names else 'none'}"
    )
    if data:
        text += f"\ndata: {data}"
    return text


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _figure(results, title, vectors, data, size=(7.5, 4.8)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    ax.set_title(title)
    fig.text(0.01, -0.02, _footer(results, vectors, data), fontsize=7, va="top", family="monospace")
    return fig, ax


def plot_steering_curves(results: dict, out_dir: Path) -> list[Path]:
    """Per behaviour: P(matching) with 95% bands (left) and the paired effect against unsteered (right)."""
    paths = []
    for behaviour, entry in results.get("ab", {}).items():
        names = [f"{behaviour}/{n}" for n in entry["curves"]]
        fig, ax = _figure(
            results, f"Steering curve: {behaviour} (A/B, n={entry['n']})", names, entry["data"], size=(11, 4.6)
        )
        ax.remove()
        left, right = fig.subplots(1, 2, gridspec_kw={"wspace": 0.3})
        fig.suptitle(f"Steering curves: {behaviour} (A/B, n={entry['n']})")
        for name, pts in entry["curves"].items():
            xs = [p["multiplier"] for p in pts]
            left.plot(xs, [p["mean"] for p in pts], marker="o", label=name)
            left.fill_between(xs, [p["ci_low"] for p in pts], [p["ci_high"] for p in pts], alpha=0.2)
            if all("delta" in p for p in pts):
                right.plot(xs, [p["delta"] for p in pts], marker="o", label=name)
                right.fill_between(xs, [p["delta_ci_low"] for p in pts], [p["delta_ci_high"] for p in pts], alpha=0.2)
        left.axhline(entry["baseline"], color="grey", ls="--", lw=0.8, label="unsteered")
        left.set_xlabel("multiplier")
        left.set_ylabel("P(matching option), normalised over A/B")
        left.set_ylim(0, 1)
        left.set_title("mean, 95% CI", fontsize=9)
        left.legend(fontsize=8)
        right.axhline(0, color="grey", ls="--", lw=0.8)
        right.set_xlabel("multiplier")
        right.set_ylabel("effect: steered - unsteered (same items)")
        right.set_title("paired effect, 95% CI", fontsize=9)
        right.legend(fontsize=8)
        paths.append(_save(fig, out_dir / f"steering_{behaviour}.png"))
    return paths


def plot_culture(results: dict, out_dir: Path) -> list[Path]:
    culture = results.get("culture") or {}
    if not culture:
        return []
    import numpy as np

    names = sorted({n for e in culture.values() for n in e["localized"]["accuracy"]}, key=lambda n: n != "unsteered")
    groups = [(c, s) for c in culture for s in ("localized", "non_localized")]
    vecs = [f"{c}/{n}" for c in culture for n in names if n != "unsteered"]
    fig, ax = _figure(
        results,
        "Cultural multiple choice (BLEnD), accuracy",
        vecs,
        "BLEnD digest (yapo_fast/assets/data/blend), test split",
        size=(max(7.5, 1.6 * len(groups)), 4.8),
    )
    width = 0.8 / len(names)
    x = np.arange(len(groups))
    for j, name in enumerate(names):
        accs = [culture[c][s]["accuracy"].get(name, {}) for c, s in groups]
        vals = [a.get("accuracy", float("nan")) for a in accs]
        err = [
            [v - a.get("ci_low", v) for v, a in zip(vals, accs)],
            [a.get("ci_high", v) - v for v, a in zip(vals, accs)],
        ]
        ax.bar(x + j * width - 0.4 + width / 2, vals, width, yerr=err, capsize=2, label=name)
    ax.axhline(0.25, color="grey", ls=":", lw=0.8, label="chance (4 options)")
    ax.set_xticks(x, [f"{c}\n{s.replace('_', '-')}" for c, s in groups], fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return [_save(fig, out_dir / "culture_accuracy.png")]


def plot_mmlu(results: dict, out_dir: Path) -> list[Path]:
    mm = results.get("mmlu")
    if not mm:
        return []
    names = list(mm["accuracy"])
    fig, ax = _figure(
        results,
        f"MMLU subset ({mm['n']} items, {mm['shots']}-shot), multiplier {mm['multiplier']:g}",
        [n for n in names if n != "unsteered"],
        "yapo_fast/assets/data/mmlu (hendrycks/test subset)",
        size=(max(7.5, 1.2 * len(names)), 4.8),
    )
    vals = [mm["accuracy"][n]["accuracy"] for n in names]
    err = [
        [v - mm["accuracy"][n]["ci_low"] for n, v in zip(names, vals)],
        [mm["accuracy"][n]["ci_high"] - v for n, v in zip(names, vals)],
    ]
    ax.bar(range(len(names)), vals, yerr=err, capsize=3, color=["grey"] + ["C0"] * (len(names) - 1))
    ax.axhline(0.25, color="grey", ls=":", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    return [_save(fig, out_dir / "mmlu.png")]


def plot_training(results: dict, out_dir: Path) -> list[Path]:
    training = results.get("training") or {}
    curves = {n: t["losses"] for n, t in training.items() if t.get("losses")}
    if not curves:
        return []
    data = ", ".join(sorted({str(t.get("data")) for t in training.values()}))
    fig, ax = _figure(results, "Training loss (bi-directional DPO)", list(curves), data)
    for name, losses in curves.items():
        ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], label=name, lw=1)
    ax.axhline(0.6931, color="grey", ls=":", lw=0.8, label="log 2 (v = 0)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    return [_save(fig, out_dir / "training_loss.png")]


def _half(e: dict) -> float:
    return (e["delta_ci_high"] - e["delta_ci_low"]) / 2


def _margin_lines(results: dict) -> list[str]:
    lines = []
    for behaviour, entry in (results.get("margin") or {}).items():
        lines += [
            f"## Held-out preference margin: {behaviour}",
            "",
            f"Change of log p(matching) − log p(not matching) (nats, summed over the response) against the "
            f"unsteered model on the same {entry['n']} held-out pairs of `{entry['data']}` (unsteered mean "
            f"{entry['unsteered_mean']:+.2f}); paired 95% CI half-width in brackets; *moved*: the share of "
            "pairs whose margin moves the way the multiplier's sign asks.",
            "",
            "| vector | multiplier | effect (nats) | moved |",
            "|---|---|---|---|",
        ]
        lines += _effect_rows(
            entry["effects"],
            lambda name, e: (
                f"| {name} | {e['multiplier']:+g} | {e['delta']:+.2f} (±{_half(e):.2f}) | {e['moved']:.2f} |"
            ),
        )
        lines.append("")
    return lines


def _effect_rows(effects: dict, row) -> list[str]:
    """One table row per (vector, multiplier) effect: row(name, effect) -> str."""
    return [row(name, e) for name, per_m in effects.items() for e in per_m]


def _scored_generation_lines(results: dict) -> list[str]:
    lines = []
    for behaviour, g in (results.get("scored_generations") or {}).items():
        lines += [
            f"## Scored generations: {behaviour}",
            "",
            f"Greedy answers to {len(g['rows'])} held-out prompts, each scored for the trained behaviour. "
            f"Score: {g['rule']}. Unsteered mean score {g['unsteered_rate']:.2f}; effect = change of the "
            "mean score, paired on the same prompts (95% CI half-width in brackets).",
            "",
            "| vector | multiplier | mean score | effect |",
            "|---|---|---|---|",
        ]
        lines += _effect_rows(
            g["effects"],
            lambda name, e: (
                f"| {name} | {e['multiplier']:+g} | {e['rate']:.2f} | {e['delta']:+.2f} (±{_half(e):.2f}) |"
            ),
        )
        lines += ["", "First answers, unsteered and steered both ways (score in brackets):", ""]
        for row in g["rows"][:6]:
            lines.append(f"**Prompt:** {row['prompt']}")
            for key, score in row["scores"].items():
                lines.append(f"- *{key}* [{score}]: {row[key]!s}".replace("\n", " "))
            lines.append("")
    return lines


def plot_margin(results: dict, out_dir: Path) -> list[Path]:
    """Per behaviour: held-out margin effect with its paired 95% CI, per vector, at each multiplier."""
    paths = []
    for behaviour, entry in (results.get("margin") or {}).items():
        names = list(entry["effects"])
        fig, ax = _figure(
            results,
            f"Held-out preference margin: {behaviour} (n={entry['n']})",
            [f"{behaviour}/{n}" for n in names],
            entry["data"],
        )
        ms = sorted({e["multiplier"] for effs in entry["effects"].values() for e in effs})
        width = 0.8 / max(1, len(names))
        for k, name in enumerate(names):
            effs = {e["multiplier"]: e for e in entry["effects"][name]}
            xs = [i + (k - (len(names) - 1) / 2) * width for i, m in enumerate(ms) if m in effs]
            es = [effs[m] for m in ms if m in effs]
            ax.bar(xs, [e["delta"] for e in es], width, yerr=[_half(e) for e in es], capsize=3, label=name)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(ms)), [f"m={m:+g}" for m in ms])
        ax.set_ylabel("Δ log p(matching) − log p(not matching) [nats]")
        ax.legend()
        paths.append(_save(fig, out_dir / f"margin_{behaviour}.png"))
    return paths


def markdown(results: dict, plots: list[Path]) -> str:
    meta = results.get("meta", {})
    sae = meta.get("sae") or {}
    lines = [
        "# yapo-fast evaluation report",
        "",
        f"- model: {meta.get('model')}",
        f"- SAE: {sae.get('name')} ({sae.get('kind')}, d_sae={sae.get('d_sae')}, layer {sae.get('layer')}, "
        f"weights hash {sae.get('hash')})"
        if sae
        else "- SAE: none",
        f"- created: {meta.get('created')}; evaluation time {meta.get('seconds', 0):.0f} s",
        "",
    ]
    if results.get("scale"):
        lines += [
            "## Vector scale (m=1)",
            "",
            "edit = mean over tokens of ‖h' − h‖ / ‖h‖ at the steered layer; for YaPO vectors also the "
            "largest \\|m v_i\\|, the median \\|m v_i\\| of the 20 largest entries against the median activation "
            "(where active) of those features, and how many of them never fire on the prompts.",
            "",
            "| vector | ‖v‖ | edit ‖h'−h‖/‖h‖ | max m·v_i (abs) | top-20 m·v_i (abs, median) | "
            "their z when active (median) | never active |",
            "|---|---|---|---|---|---|---|",
        ]
        for n, sc in results["scale"].items():
            f = lambda k: "" if k not in sc else f"{sc[k]:.3g}"  # noqa: E731
            lines.append(
                f"| {n} | {sc['vector_norm']:.3g} | {sc['edit_ratio']:.3g} | {f('max_abs_mv')} | "
                f"{f('top_abs_mv_median')} | {f('z_active_median')} | {sc.get('top_never_active', '')} |"
            )
        lines.append("")
    if results.get("training"):
        lines += [
            "## Training",
            "",
            "| vector | data | pairs | steps | seconds | final loss |",
            "|---|---|---|---|---|---|",
        ]
        for n, t in results["training"].items():
            final = f"{t['losses'][-1]['loss']:.4f}" if t.get("losses") else "-"
            lines.append(
                f"| {n} | {t.get('data')} | {t.get('pairs')} | {t.get('steps') or '-'} | "
                f"{t.get('seconds', 0):.1f} | {final} |"
            )
        lines.append("")
    lines += _margin_lines(results) + _scored_generation_lines(results)
    for behaviour, reason in (results.get("ab_skipped") or {}).items():
        lines += [f"## Steering curve: {behaviour}", "", f"Not run: {reason}.", ""]
    for behaviour, entry in results.get("ab", {}).items():
        ms = [p["multiplier"] for p in next(iter(entry["curves"].values()))] if entry["curves"] else []
        lines += [
            f"## Steering curve: {behaviour}",
            "",
            f"P(matching option) over A/B, mean over {entry['n']} items of `{entry['data']}` "
            f"(95% CI half-width in brackets); unsteered {entry['baseline']:.3f}.",
            "",
            "| vector | " + " | ".join(f"m={m:g}" for m in ms) + " |",
            "|---|" + "---|" * len(ms),
        ]
        for name, pts in entry["curves"].items():
            lines.append(
                f"| {name} | "
                + " | ".join(f"{p['mean']:.3f} (±{(p['ci_high'] - p['ci_low']) / 2:.3f})" for p in pts)
                + " |"
            )
        if all("delta" in p for pts in entry["curves"].values() for p in pts):
            lines += [
                "",
                "Effect against unsteered on the same items (paired 95% CI half-width in brackets):",
                "",
                "| vector | " + " | ".join(f"m={m:g}" for m in ms) + " |",
                "|---|" + "---|" * len(ms),
            ]
            for name, pts in entry["curves"].items():
                lines.append(
                    f"| {name} | "
                    + " | ".join(
                        f"{p['delta']:+.3f} (±{(p['delta_ci_high'] - p['delta_ci_low']) / 2:.3f})" for p in pts
                    )
                    + " |"
                )
        lines.append("")
    if results.get("culture"):
        lines += [
            "## Cultural multiple choice (BLEnD)",
            "",
            "| country | vector | localized | non-localized | gap |",
            "|---|---|---|---|---|",
        ]
        for c, e in results["culture"].items():
            for name in e["localized"]["accuracy"]:
                lo = e["localized"]["accuracy"][name]["accuracy"]
                nl = e["non_localized"]["accuracy"][name]["accuracy"]
                lines.append(
                    f"| {c} | {name} | {lo:.3f} (n={e['localized']['n']}) | {nl:.3f} "
                    f"(n={e['non_localized']['n']}) | {e['gap'][name]:+.3f} |"
                )
        lines.append("")
    if results.get("mmlu"):
        mm = results["mmlu"]
        lines += [
            f"## MMLU subset ({mm['n']} items, {mm['shots']}-shot, multiplier {mm['multiplier']:g})",
            "",
            "| vector | accuracy | change | change 95% CI (paired) |",
            "|---|---|---|---|",
        ]
        for name, a in mm["accuracy"].items():
            ch = mm["change"].get(name)
            ci = (mm.get("change_ci95") or {}).get(name)
            lines.append(
                f"| {name} | {a['accuracy']:.3f} | {'' if ch is None else f'{ch:+.3f}'} | "
                f"{'' if ci is None else f'[{ci[0]:+.3f}, {ci[1]:+.3f}]'} |"
            )
        lines.append("")
    for behaviour, g in (results.get("generations") or {}).items():
        lines += [f"## Generations: {behaviour} (multiplier {g['multiplier']:g})", ""]
        for row in g["rows"]:
            lines.append(f"**Prompt:** {row['prompt']}")
            for k, v in row.items():
                if k != "prompt":
                    lines.append(f"- *{k}*: {v!s}".replace("\n", " "))
            lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path | list[Path]]:
    """Write results.json, report.md and the plots into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = (
        plot_margin(results, out)
        + plot_steering_curves(results, out)
        + plot_culture(results, out)
        + plot_mmlu(results, out)
        + plot_training(results, out)
    )
    json_path, md_path = out / "results.json", out / "report.md"
    write_text_atomic(json_path, json.dumps(results, indent=2, default=str))
    write_text_atomic(md_path, markdown(results, plots))
    return {"json": json_path, "markdown": md_path, "plots": plots}
