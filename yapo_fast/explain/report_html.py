"""The explain report as one self-contained HTML page: inline CSS, no script, no external URL, every
string from the model or the corpus escaped. Opens offline in any browser."""

from __future__ import annotations

from html import escape

from yapo_fast.explain.report_md import summary_lines

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1d2430;background:#f6f7f9}
h1{font-size:22px;margin:0 0 8px}h2{font-size:17px;margin:26px 0 8px}
ul.summary{background:#fff;border:1px solid #d9dde3;border-radius:8px;padding:12px 28px}
table{border-collapse:collapse;background:#fff;font-variant-numeric:tabular-nums}
td,th{border:1px solid #d9dde3;padding:3px 8px;text-align:right}th{background:#eef1f5}
.tables{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:14px}
.card{background:#fff;border:1px solid #d9dde3;border-radius:8px;padding:12px 14px}
.card h3{margin:0 0 6px;font-size:15px}.add{color:#0b6b2f}.cap{color:#a3261b}.along{color:#0b6b2f}.against{color:#a3261b}
.stats{color:#4a5565;font-size:13px;margin:2px 0}
.lens span{display:inline-block;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;border-radius:4px;
 padding:0 4px;margin:1px 2px;white-space:pre}
.lens .up{background:#dcf3e3}.lens .down{background:#f8dcd8}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;white-space:pre-wrap;word-break:break-word;
 border-top:1px solid #eef1f5;padding:3px 0}
.ctx .act{display:inline-block;min-width:54px;color:#4a5565}.ctx .src{color:#7a8594}
.ctx mark{background:#ffcf4a;border-radius:3px;padding:0 1px;font-weight:bold}
.defs{color:#4a5565;font-size:13px}
"""


def _num(x, fmt=".4g") -> str:
    return "–" if x is None else format(x, fmt)


def _tok(s: str) -> str:
    return escape(s.replace("\n", "⏎"))


def _context(ctx: dict) -> str:
    parts = []
    for j, t in enumerate(ctx["tokens"]):
        parts.append(f"<mark>{_tok(t)}</mark>" if j == ctx["highlight"] else _tok(t))
    return (
        f'<div class="ctx"><span class="act">{ctx["activation"]:.3g}</span>{"".join(parts)} '
        f'<span class="src">[{escape(ctx["source"])}]</span></div>'
    )


def _card(c: dict) -> str:
    if "effect" in c:
        head = f'<span class="{c["role"]}">{c["role"]}</span> · effect {_num(c["effect"])} · m·v = {c["scaled"]:+.4g}'
    else:
        head = f'<span class="{c["role"]}">{c["role"]}</span> · cos {c["cos"]:+.4f}'
    out = [f'<div class="card" id="latent-{c["latent"]}"><h3>#{c["rank"]} latent {c["latent"]} — {head}</h3>']
    if "corpus" in c:
        k = c["corpus"]
        out.append(
            f'<p class="stats">corpus: fires on {k["frequency"]:.2%} of tokens · mean {_num(k["mean"])} · '
            f"max {_num(k['max'])}</p>"
        )
    if c.get("training"):
        t = c["training"]
        out.append(
            f'<p class="stats">training data: chosen {t["chosen"]["frequency"]:.2%} (mean {_num(t["chosen"]["mean"])})'
            f" · rejected {t['rejected']['frequency']:.2%} (mean {_num(t['rejected']['mean'])})</p>"
        )
    if "logit_lens" in c:
        up = "".join(f'<span class="up">{_tok(x["token"])}</span>' for x in c["logit_lens"]["top"])
        down = "".join(f'<span class="down">{_tok(x["token"])}</span>' for x in c["logit_lens"]["bottom"])
        out.append(f'<p class="lens stats">promotes {up}</p><p class="lens stats">suppresses {down}</p>')
    if c.get("contexts"):
        out += [_context(x) for x in c["contexts"]]
    elif "contexts" in c:
        out.append('<p class="stats">no indexed token activates this feature</p>')
    out.append("</div>")
    return "\n".join(out)


TABLE_ROWS = 20  # rows shown per table on the page (report.json and report.md hold them all)


def _latent_cell(latent: int, carded: set[int]) -> str:
    return f'<a href="#latent-{latent}">{latent}</a>' if latent in carded else str(latent)


def _entries_table(title: str, rows: list[dict], carded: set[int]) -> str:
    if not rows:
        return f"<div><h2>{escape(title)}</h2><p>(none)</p></div>"
    body = "".join(
        f"<tr><td>{e['rank']}</td><td>{_latent_cell(e['latent'], carded)}</td>"
        f"<td>{e['value']:.4g}</td><td>{e['scaled']:.4g}</td><td>{e['decoder_norm']:.4g}</td>"
        f"<td>{e['effect']:.4g}</td></tr>"
        for e in rows[:TABLE_ROWS]
    )
    return (
        f"<div><h2>{escape(title)}</h2><table><tr><th>rank</th><th>latent</th><th>v</th><th>m·v</th>"
        f"<th>‖W_dec‖</th><th>effect</th></tr>{body}</table></div>"
    )


def _md_inline(s: str) -> str:
    """The summary lines are Markdown; keep them as text, code spans as <code>."""
    parts = escape(s.lstrip("- ")).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(r: dict) -> str:
    lines = summary_lines(r)
    carded = {c["latent"] for c in r["features"]}
    title = escape(lines[0].lstrip("# "))
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{title}</title><style>{CSS}</style></head><body>",
        f"<h1>{title}</h1>",
        '<ul class="summary">' + "".join(f"<li>{_md_inline(x)}</li>" for x in lines[2:]) + "</ul>",
    ]
    if "ranking" in r:
        out.append(
            '<div class="tables">'
            + _entries_table("Entries that add a feature (m·v > 0)", r["ranking"]["add"], carded)
            + _entries_table("Entries that cap a feature (m·v < 0)", r["ranking"]["cap"], carded)
            + "</div>"
        )
    if "projection" in r:
        p = r["projection"]
        rows = "".join(
            f"<tr><td>{a['rank']}</td><td>{_latent_cell(a['latent'], carded)}</td><td>{a['cos']:+.4f}</td></tr>"
            for a in p["top_aligned"][:TABLE_ROWS]
        )
        omp = "".join(
            f"<tr><td>{t}</td><td>{o['latent']}</td><td>{o['explained']:.1%}</td></tr>"
            for t, o in enumerate(p["omp"][:TABLE_ROWS], 1)
        )
        out.append(
            '<div class="tables"><div><h2>Top aligned SAE features</h2><table><tr><th>rank</th><th>latent</th>'
            f"<th>cos</th></tr>{rows}</table></div><div><h2>Matching pursuit</h2><table><tr><th>picks</th>"
            f"<th>latent</th><th>explained ‖v‖²</th></tr>{omp}</table></div></div>"
        )
    out.append(f'<h2>Feature cards ({len(r["features"])})</h2><div class="cards">')
    out += [_card(c) for c in r["features"]]
    out.append('</div><h2>Definitions</h2><ul class="defs">')
    out += [f"<li><b>{escape(k)}</b>: {escape(v)}</li>" for k, v in r["definitions"].items()]
    out.append("</ul></body></html>")
    return "\n".join(out) + "\n"
