"""Which layer should the shipped SAE read? A quick measurement (docs/sae.md).

`yapo-fast sae train --layer 15 --cache-layers 9,12,18 ...` caches the activations of several
decoder layers over the same text in one forward pass. This script trains the same small SAE on
each layer's cache (sae-lens trainer; TopK k=32, width 4 x d_model, 3 epochs over 85% of the rows)
and reports the variance it explains on the other 15%, with the activation norms: the layer the
SAE can describe best at a fixed sparsity, among the middle layers YaPO steers at.

Usage: .venv/bin/python scripts/sae_layer_scan.py runs/sae-work/activations [--out runs/sae_layer_scan.json]
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cache_root")
    ap.add_argument("--out", default="runs/sae_layer_scan.json")
    ap.add_argument("--max-rows", type=int, default=12000)
    args = ap.parse_args()
    from yapo_fast.atomic import write_text_atomic
    from yapo_fast.sae.train import load_activation_chunks, train_on_activations

    dirs = sorted(Path(args.cache_root).iterdir())
    # caches are kept per text source (…-L15-corpus-…, …-L15-chat-…): compare layers on one source
    if any("-corpus-" in d.name for d in dirs):
        dirs = [d for d in dirs if "-corpus-" in d.name]
    by_layer = {int(re.search(r"-L(\d+)-", d.name).group(1)): d for d in dirs}
    # the chunks every layer has (they were written together)
    common = set.intersection(*[{p.name for p in d.glob("chunk_*.safetensors")} for d in by_layer.values()])
    names = sorted(common)
    results = {}
    for layer, d in sorted(by_layer.items()):
        x = load_activation_chunks([d / n for n in names])[: args.max_rows]
        split = int(0.85 * len(x))
        sae = train_on_activations(
            x[:split], kind="topk", d_sae=4 * x.shape[1], k=32, total_samples=3 * split, batch_size=512, seed=0
        )
        with torch.no_grad():
            held = x[split:]
            rec = sae.decode(sae.encode(held))
            fve = 1 - (held - rec).pow(2).sum() / (held - held.mean(0)).pow(2).sum()
        results[layer] = {
            "quick_topk_heldout_fve": round(fve.item(), 4),
            "rows": len(x),
            "mean_norm": round(x.norm(dim=-1).mean().item(), 2),
        }
        print(layer, results[layer], file=sys.stderr, flush=True)
    write_text_atomic(args.out, json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
