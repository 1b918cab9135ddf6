"""explain(): what a steering vector does, in SAE features, as one JSON-ready dict.

    report = yapo_fast.explain("v.safetensors", sae=sae, out="runs/explain")   # + report.html/.md/.json

A YaPO vector: its entries ranked by effect (ranking.py), split into those that add a feature
(m*v_i > 0) and those that cap one (m*v_i < 0), with the share of the delta-norm bound that the
top 10 / 50 carry. A BiPO or CAA vector: its projection onto the SAE's decoder directions
(dense_projection.py). Then a card per top feature: top-activating corpus contexts (from the cached
activation index), logit-lens tokens, and its frequency and mean on the vector's training data,
chosen vs rejected.
"""

from __future__ import annotations

import os
from pathlib import Path

from yapo_fast.errors import YapoFastError

REPORT_FORMAT = 1

DEFINITIONS = {
    "effect": "effect_i = |m * v_i| * ||W_dec[i]||: the largest norm entry i can add to the layer output "
    "(exactly its norm where m*v_i > 0, an upper bound where it caps a feature).",
    "share": "share(k) = (sum of the k largest effects) / (sum of all effects): the fraction of the bound "
    "sum_i effect_i >= ||h' - h|| carried by the k strongest entries, both signs ranked together.",
    "entries_for_q": "smallest k with share(k) >= q.",
    "alignment": "cos_i = <v, W_dec[i]> / (||v|| ||W_dec[i]||).",
    "features_for_q": "orthogonal matching pursuit over unit decoder rows: the number of picks after which "
    "the least-squares fit on the picked rows carries >= q of ||v||^2.",
    "training_stats": "over response tokens of the training pairs (unsteered model, vector's layer): "
    "frequency = share of tokens with z_i > 0; mean = mean z_i, zeros included.",
    "corpus_stats": "the same two numbers over every indexed corpus token (position 0 of each row excluded).",
}


_STATS_MEMO: dict = {}


def _resolve_data(vector, vector_path: Path | None, data) -> tuple[Path | None, str]:
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise YapoFastError(
                f"training data {path} does not exist: give the BiPO CSV or JSONL the vector was trained on"
            )
        return path, "given"
    recorded = (vector.info or {}).get("data")
    if not recorded:
        return None, "the vector records no training data (vector.info['data']); pass data=... / --data"
    candidates = [Path(recorded)]
    if vector_path is not None:
        candidates.append(vector_path.parent / recorded)
    for c in candidates:
        if c.is_file():
            return c, "from vector.info['data']"
    return None, f"the vector's training data {recorded!r} is not on this machine; pass data=... / --data"


def _token_str(tokenizer):
    def decode(i: int) -> str:
        return tokenizer.decode([int(i)])

    return decode


def explain(
    vector,
    *,
    model=None,
    tokenizer=None,
    sae=None,
    multiplier: float | None = None,
    top: int = 12,
    list_entries: int = 50,
    contexts: int = 6,
    lens_tokens: int = 8,
    data=None,
    data_pairs: int = 32,
    index_tokens: int = 32768,
    index_top_n: int = 16,
    seq_len: int = 64,
    index_docs=None,
    cache: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Explain a steering vector in SAE features; returns the report dict (JSON-ready).

    vector: a SteeringVector or a path to one. model: a loaded transformers model (then pass
    tokenizer too), a path/id, or None for the embedded default. sae: an SAE, a sae-lens directory,
    or None for the shipped default. With `out`, also writes report.json, report.md and
    report.html there (atomically) and records their paths under report["files"].
    """
    from yapo_fast.explain.activation_index import load_or_build_index
    from yapo_fast.explain.data_stats import chosen_rejected_stats
    from yapo_fast.explain.dense_projection import project_dense
    from yapo_fast.explain.logit_lens import logit_lens
    from yapo_fast.explain.ranking import rank_vector
    from yapo_fast.model import load_model, model_identity
    from yapo_fast.sae.autoencoder import SAE, load_sae
    from yapo_fast.vector import SteeringVector, load_vector

    vector_path = None
    if not isinstance(vector, SteeringVector):
        vector_path = Path(vector)
        vector = load_vector(vector_path)
    if model is None or isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_model(model)
    elif tokenizer is None:
        raise YapoFastError("explain() was given a model object but no tokenizer: pass tokenizer=... too")
    sae = sae if isinstance(sae, SAE) else load_sae(sae)
    ident = model_identity(model)
    vector.check_compatible(model=ident, sae=sae if vector.is_sparse else None)
    if sae.d_in != vector.d_model:
        raise YapoFastError(
            f"SAE {sae.name!r} reads d_in={sae.d_in} but the vector has d_model={vector.d_model}: "
            "use an SAE of the vector's model"
        )
    if sae.layer is not None and sae.layer != vector.layer:
        raise YapoFastError(
            f"the vector steers layer {vector.layer} but SAE {sae.name!r} reads layer {sae.layer}: "
            "its features would not describe this vector; use an SAE of that layer"
        )
    layer = vector.layer
    m = vector.multiplier if multiplier is None else float(multiplier)

    report: dict = {
        "format": REPORT_FORMAT,
        "vector": {
            "path": str(vector_path) if vector_path else None,
            "method": vector.method,
            "layer": layer,
            "multiplier": m,
            "d_model": vector.d_model,
            "d_sae": vector.d_sae,
            "nnz": int(vector.values.numel()) if vector.is_sparse else None,
            "norm": float(vector.values.float().norm()),
            "info": vector.info,
            "model": vector.model,
        },
        "model": ident,
        "sae": sae.identity() | {"layer": sae.layer},
        "definitions": DEFINITIONS,
    }

    # ---- which features ---------------------------------------------------------------------
    W_dec = sae.W_dec.detach().float().cpu()
    if vector.is_sparse:
        ranking = rank_vector(vector, sae, m)
        report["ranking"] = {
            "total_effect": ranking.total_effect,
            "share_top10": ranking.share(10),
            "share_top50": ranking.share(50),
            "entries_for_50": ranking.entries_for_share(0.5) if ranking.entries else 0,
            "entries_for_90": ranking.entries_for_share(0.9) if ranking.entries else 0,
            "n_add": len(ranking.positive),
            "n_cap": len(ranking.negative),
            "add": [e.to_dict() for e in ranking.positive[:list_entries]],
            "cap": [e.to_dict() for e in ranking.negative[:list_entries]],
        }
        picked = [
            {
                "latent": e.latent,
                "rank": e.rank,
                "role": e.role,
                "value": e.value,
                "scaled": e.scaled,
                "effect": e.effect,
                "decoder_norm": e.decoder_norm,
            }
            for e in ranking.entries[:top]
        ]
    else:
        proj = project_dense(vector.dense() * m, W_dec)
        aligned = proj.top_aligned(max(top, list_entries))
        report["projection"] = {
            "vector_norm": proj.vector_norm,
            "features_for_50": proj.features_for(0.5),
            "features_for_90": proj.features_for(0.9),
            "omp_max_features": 256,
            "omp": [{"latent": i, "explained": e} for i, e in zip(proj.omp_latents, proj.omp_explained)][:list_entries],
            "top_aligned": [{"latent": i, "cos": c, "rank": r} for r, (i, c) in enumerate(aligned, 1)],
        }
        picked = [
            {
                "latent": i,
                "rank": r,
                "role": "along" if c > 0 else "against",
                "cos": c,
                "decoder_norm": float(W_dec[i].norm()),
            }
            for r, (i, c) in enumerate(aligned[:top], 1)
        ]

    # ---- what they mean -----------------------------------------------------------------------
    decode = _token_str(tokenizer)
    latents = [p["latent"] for p in picked]
    if latents:
        lens = logit_lens(model, W_dec[latents], k=lens_tokens)
        index, index_path = load_or_build_index(
            model,
            tokenizer,
            sae,
            layer,
            docs=index_docs,
            top_n=index_top_n,
            seq_len=seq_len,
            max_tokens=index_tokens,
            cache=cache,
            progress=progress,
        )
        report["index"] = {
            "path": str(index_path),
            "n_tokens": index.n_tokens,
            "top_n": index_top_n,
            "seq_len": index.seq_len,
            "sources": sorted(set(index.sources)),
        }
        data_path, data_note = _resolve_data(vector, vector_path, data)
        stats, pairs = None, []
        if data_path is not None:
            from yapo_fast.data.pairs import load_pairs

            pairs = load_pairs(data_path, limit=data_pairs)
            # every latent at once, kept for this process: explaining several vectors on the same data
            # (the CLI's side-by-side mode) runs the model over the data only once
            key = (
                id(model),
                ident.get("fingerprint"),
                sae.weights_hash(),
                layer,
                str(data_path.resolve()),
                data_path.stat().st_mtime,
                len(pairs),
            )
            if key not in _STATS_MEMO:
                _STATS_MEMO.clear()
                _STATS_MEMO[key] = chosen_rejected_stats(model, tokenizer, sae, layer, pairs, None, progress=progress)
            full = _STATS_MEMO[key]
            stats = {
                side: {
                    "tokens": full[side]["tokens"],
                    "frequency": [full[side]["frequency"][i] for i in latents],
                    "mean": [full[side]["mean"][i] for i in latents],
                }
                for side in full
            }
        report["training_data"] = {
            "path": str(data_path) if data_path else None,
            "note": data_note,
            "pairs": len(pairs),
            "tokens": {s: stats[s]["tokens"] for s in stats} if stats else None,
        }
        for j, card in enumerate(picked):
            i = card["latent"]
            card["logit_lens"] = {
                side: [{"token": decode(t), "logit": v} for t, v in lens[j][side]] for side in ("top", "bottom")
            }
            card["contexts"] = index.contexts(i, decode, n=contexts)
            card["corpus"] = {
                "frequency": float(index.frequency[i]),
                "mean": float(index.mean_activation[i]),
                "max": float(index.values[i, 0]) if index.top(i, 1) else 0.0,
            }
            card["training"] = (
                None
                if stats is None
                else {
                    side: {"frequency": stats[side]["frequency"][j], "mean": stats[side]["mean"][j]}
                    for side in ("chosen", "rejected")
                }
            )
    report["features"] = picked
    if out is not None:
        report["files"] = {k: str(v) for k, v in write_report(report, out).items()}
    return report


def write_report(report: dict, out: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md and report.html into folder `out` (each atomically)."""
    import json

    from yapo_fast.atomic import atomic_path
    from yapo_fast.explain.report_html import render_html
    from yapo_fast.explain.report_md import render_markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    body = {k: v for k, v in report.items() if k != "files"}
    texts = {
        "json": json.dumps(body, indent=1, ensure_ascii=False),
        "md": render_markdown(body),
        "html": render_html(body),
    }
    for kind, path in paths.items():
        with atomic_path(path) as tmp:
            tmp.write_text(texts[kind], encoding="utf-8")
    return paths
