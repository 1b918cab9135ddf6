"""Several explained vectors side by side (e.g. YaPO, BiPO and CAA for one behaviour): one row per
vector with its headline numbers and top features, and the overlap of their top-feature sets.

Headline per vector: a YaPO vector's entries for 50% / 90% of its effect mass (ranking.py); a
dense vector's SAE features for 50% / 90% of its squared norm (matching pursuit,
dense_projection.py). Overlap of two vectors = |top-k(A) & top-k(B)| for their top-k latents
(by effect for YaPO, by |cos| for dense vectors)."""

from __future__ import annotations

import os
from html import escape
from pathlib import Path


def top_latents(report: dict, k: int) -> list[int]:
    if "ranking" in report:
        entries = sorted(report["ranking"]["add"] + report["ranking"]["cap"], key=lambda e: e["rank"])
        return [e["latent"] for e in entries[:k]]
    return [a["latent"] for a in report["projection"]["top_aligned"][:k]]


def headline(report: dict) -> dict:
    if "ranking" in report:
        k = report["ranking"]
        return {
            "for_50": k["entries_for_50"],
            "for_90": k["entries_for_90"],
            "share_top10": k["share_top10"],
            "measure": "entries for q of the effect mass",
        }
    p = report["projection"]
    return {
        "for_50": p["features_for_50"],
        "for_90": p["features_for_90"],
        "share_top10": None,
        "measure": "OMP features for q of ||v||^2",
    }


def compare(reports: dict[str, dict], k: int = 10) -> dict:
    """{"rows": [...], "overlap": {a: {b: n}}} for named reports."""
    tops = {name: top_latents(r, k) for name, r in reports.items()}
    rows = [
        {
            "name": name,
            "method": r["vector"]["method"],
            "layer": r["vector"]["layer"],
            **headline(r),
            "top": tops[name],
            "html": (r.get("files") or {}).get("html"),
        }
        for name, r in reports.items()
    ]
    overlap = {a: {b: len(set(tops[a]) & set(tops[b])) for b in tops} for a in tops}
    return {"k": k, "rows": rows, "overlap": overlap}


def render_compare_markdown(c: dict) -> str:
    lines = [
        f"# Vectors side by side (top {c['k']} features)",
        "",
        "| vector | method | layer | 50% | 90% | measure | top features |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in c["rows"]:
        lines.append(
            f"| {r['name']} | {r['method']} | {r['layer']} | {r['for_50']} | {r['for_90']} | {r['measure']} "
            f"| {', '.join(map(str, r['top']))} |"
        )
    names = [r["name"] for r in c["rows"]]
    lines += [
        "",
        f"Shared top-{c['k']} features:",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    lines += [f"| {a} | " + " | ".join(str(c["overlap"][a][b]) for b in names) + " |" for a in names]
    return "\n".join(lines) + "\n"


def render_compare_html(c: dict) -> str:
    rows = []
    for r in c["rows"]:
        name = escape(r["name"])
        if r["html"]:
            name = f'<a href="{escape(Path(r["html"]).as_uri() if Path(r["html"]).is_absolute() else r["html"])}">{name}</a>'
        rows.append(
            f"<tr><td>{name}</td><td>{escape(r['method'])}</td><td>{r['layer']}</td><td>{r['for_50']}</td>"
            f"<td>{r['for_90']}</td><td>{escape(r['measure'])}</td><td>{escape(', '.join(map(str, r['top'])))}</td></tr>"
        )
    names = [r["name"] for r in c["rows"]]
    overlap = "".join(
        f"<tr><th>{escape(a)}</th>" + "".join(f"<td>{c['overlap'][a][b]}</td>" for b in names) + "</tr>" for a in names
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Vectors side by side</title>'
        "<style>body{font:14px system-ui,sans-serif;margin:24px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccd;padding:3px 8px}</style></head><body>"
        f"<h1>Vectors side by side (top {c['k']} features)</h1><table><tr><th>vector</th><th>method</th>"
        "<th>layer</th><th>50%</th><th>90%</th><th>measure</th><th>top features</th></tr>"
        + "".join(rows)
        + f"</table><h2>Shared top-{c['k']} features</h2><table><tr><th></th>"
        + "".join(f"<th>{escape(n)}</th>" for n in names)
        + f"</tr>{overlap}</table></body></html>\n"
    )


def write_compare(c: dict, out: str | os.PathLike) -> dict[str, Path]:
    import json

    from yapo_fast.atomic import atomic_path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = {
        "compare.json": json.dumps(c, indent=1),
        "compare.md": render_compare_markdown(c),
        "compare.html": render_compare_html(c),
    }
    paths = {}
    for name, text in texts.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        paths[name.split(".")[1]] = out / name
    return paths
