"""The explain report as Markdown (same data as report.json; the activating token in **bold**)."""

from __future__ import annotations


def _tok(s: str) -> str:
    """A token readable inside Markdown: visible whitespace, no table/format breakers."""
    s = s.replace("\n", "⏎").replace("|", "\\|").replace("`", "'").replace("*", "\\*").replace("_", "\\_")
    return s


def context_line(ctx: dict) -> str:
    parts = [_tok(t) for t in ctx["tokens"]]
    h = ctx["highlight"]
    lead = " " if parts[h][:1].isspace() else ""
    parts[h] = f"{lead}**[{parts[h].strip() or '␣'}]**"
    return "".join(parts).strip()


def summary_lines(r: dict) -> list[str]:
    v = r["vector"]
    lines = [
        f"# What this {v['method'].upper()} vector does, in SAE features",
        "",
        f"- vector: `{v['path'] or '(in memory)'}` ({v['method']}, layer {v['layer']}, multiplier {v['multiplier']:g}, "
        f"norm {v['norm']:.4g})",
        f"- model: {r['model'].get('name') or '?'} (d_model {r['model'].get('d_model')}); "
        f"SAE: {r['sae']['name']} ({r['sae']['kind']}, d_sae {r['sae']['d_sae']}, weights {r['sae']['hash']})",
    ]
    if "ranking" in r:
        k = r["ranking"]
        lines += [
            f"- {v['nnz']} non-zero entries: {k['n_add']} add a feature (m*v > 0), {k['n_cap']} cap one (m*v < 0)",
            f"- share of the delta-norm bound: top 10 entries {k['share_top10']:.1%}, top 50 {k['share_top50']:.1%}; "
            f"entries for 50%: {k['entries_for_50']}, for 90%: {k['entries_for_90']}",
        ]
    if "projection" in r:
        p = r["projection"]
        f = lambda x: "> %d" % p["omp_max_features"] if x is None else str(x)  # noqa: E731
        lines += [
            f"- SAE features to explain 50% of its squared norm: {f(p['features_for_50'])}, "
            f"90%: {f(p['features_for_90'])} (orthogonal matching pursuit)"
        ]
    if "index" in r:
        i = r["index"]
        lines.append(f"- contexts from {i['n_tokens']} indexed tokens ({', '.join(i['sources'])})")
    if "training_data" in r:
        t = r["training_data"]
        lines.append(
            f"- training data: {t['path']} ({t['pairs']} pairs)"
            if t["path"]
            else f"- training data: none ({t['note']})"
        )
    return lines


def render_markdown(r: dict) -> str:
    lines = summary_lines(r)
    if "ranking" in r:
        for key, title in (
            ("add", "Entries that add a feature (m*v > 0)"),
            ("cap", "Entries that cap a feature (m*v < 0)"),
        ):
            rows = r["ranking"][key]
            lines += ["", f"## {title}", ""]
            if not rows:
                lines.append("(none)")
                continue
            lines += ["| rank | latent | v | m*v | ‖W_dec‖ | effect |", "|---:|---:|---:|---:|---:|---:|"]
            lines += [
                f"| {e['rank']} | {e['latent']} | {e['value']:.4g} | {e['scaled']:.4g} | {e['decoder_norm']:.4g} "
                f"| {e['effect']:.4g} |"
                for e in rows
            ]
    if "projection" in r:
        lines += ["", "## Top aligned SAE features", "", "| rank | latent | cos |", "|---:|---:|---:|"]
        lines += [f"| {a['rank']} | {a['latent']} | {a['cos']:+.4f} |" for a in r["projection"]["top_aligned"]]
        lines += [
            "",
            "OMP explained fraction of ||v||^2 after t picks: "
            + ", ".join(
                f"t={t}: {o['explained']:.1%}"
                for t, o in enumerate(r["projection"]["omp"], 1)
                if t in (1, 2, 5, 10, 20, 50)
            ),
        ]
    lines += ["", "## Feature cards"]
    for c in r["features"]:
        head = (
            f"effect {c['effect']:.4g} ({c['role']}, m*v = {c['scaled']:+.4g})"
            if "effect" in c
            else f"cos {c['cos']:+.4f} ({c['role']})"
        )
        lines += ["", f"### #{c['rank']} latent {c['latent']}: {head}", ""]
        if "corpus" in c:
            lines.append(
                f"- corpus: fires on {c['corpus']['frequency']:.2%} of tokens, mean {c['corpus']['mean']:.4g}, "
                f"max {c['corpus']['max']:.4g}"
            )
        if c.get("training"):
            t = c["training"]
            lines.append(
                f"- training data: chosen fires {t['chosen']['frequency']:.2%} (mean {t['chosen']['mean']:.4g}), "
                f"rejected {t['rejected']['frequency']:.2%} (mean {t['rejected']['mean']:.4g})"
            )
        if "logit_lens" in c:
            lines.append("- logit lens, promotes: " + " ".join(f"`{_tok(x['token'])}`" for x in c["logit_lens"]["top"]))
            lines.append(
                "- logit lens, suppresses: " + " ".join(f"`{_tok(x['token'])}`" for x in c["logit_lens"]["bottom"])
            )
        if c.get("contexts"):
            lines += ["", "| activation | source | context |", "|---:|---|---|"]
            lines += [f"| {x['activation']:.3g} | {x['source']} | {context_line(x)} |" for x in c["contexts"]]
        elif "contexts" in c:
            lines.append("- no indexed token activates this feature")
    lines += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in r["definitions"].items()]
    return "\n".join(lines) + "\n"
