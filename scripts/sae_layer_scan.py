"""Which layer should the shipped SAE read? A quick measurement on the default model (see README,
"The shipped SAE"). For candidate decoder layers it records, from one forward pass per text:

- quick-SAE fit: held-out variance explained by a small TopK SAE (sae-lens trainer, k=32,
  width 4 x d_model) trained on the same few thousand tokens at every layer;
- behaviour probe: leave-out accuracy of the CAA direction (mean difference of the answer-token
  activations, matching minus not-matching) on BiPO hallucination and power-seeking pairs,
  i.e. how linearly present the behaviours YaPO steers are at that layer.

Usage: .venv/bin/python scripts/sae_layer_scan.py [--tokens 16000] [--layers 6,9,12,15,18,21]
"""

import argparse
import json
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16000)
    ap.add_argument("--layers", default="6,9,12,15,18,21")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--out", default="runs/sae_layer_scan.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    from yapo_fast import load_model
    from yapo_fast.chat import format_prompt
    from yapo_fast.data import bipo_csv_path, load_pairs
    from yapo_fast.model import decoder_layers
    from yapo_fast.text_source import corpus_documents

    layers = [int(x) for x in args.layers.split(",")]
    model, tok = load_model(None)
    blocks = decoder_layers(model)
    seen = {}

    class Stop(Exception):
        pass

    def make_hook(L):
        def hook(_m, _i, out):
            seen[L] = (out if isinstance(out, torch.Tensor) else out[0]).detach()
            if L == max(layers):
                raise Stop
        return hook

    handles = [blocks[L].register_forward_hook(make_hook(L)) for L in layers]

    def run(ids):
        seen.clear()
        try:
            with torch.no_grad():
                model(torch.tensor([ids]))
        except Stop:
            pass
        return {L: seen[L][0] for L in layers}

    # 1) activations over detokenised corpus text, 256-token windows, first position dropped
    acts = {L: [] for L in layers}
    n, t0 = 0, time.time()
    for doc in corpus_documents():
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids) - 64, 256):
            out = run(ids[s:s + 256])
            for L in layers:
                acts[L].append(out[L][1:])
            n += len(ids[s:s + 256]) - 1
            if n >= args.tokens:
                break
        if n >= args.tokens:
            break
    print(f"collected {n} tokens in {time.time() - t0:.0f}s", file=sys.stderr)

    # 2) behaviour probes
    probe = {L: [] for L in layers}
    for behaviour in ("hallucination", "power-seeking"):
        pairs = load_pairs(bipo_csv_path(behaviour), limit=args.pairs)
        diffs = {L: [] for L in layers}
        for p in pairs:
            prompt = tok(format_prompt(tok, p.prompt), add_special_tokens=False)["input_ids"]
            means = []
            for ans in (p.chosen, p.rejected):
                a = tok(ans, add_special_tokens=False)["input_ids"]
                out = run(prompt + a)
                means.append({L: out[L][len(prompt):].mean(0) for L in layers})
            for L in layers:
                diffs[L].append((means[0][L], means[1][L]))
        for L in layers:
            pos = torch.stack([d[0] for d in diffs[L]])
            neg = torch.stack([d[1] for d in diffs[L]])
            half = len(pos) // 2  # CAA direction from the first half, accuracy on the second
            v = (pos[:half] - neg[:half]).mean(0)
            acc = ((pos[half:] - neg[half:]) @ v > 0).float().mean().item()
            probe[L].append(acc)

    # 3) quick TopK SAEs, sae-lens trainer
    from yapo_fast.sae_train import train_on_activations

    results = {}
    for L in layers:
        x = torch.cat(acts[L])
        split = int(0.85 * len(x))
        sae = train_on_activations(x[:split], kind="topk", d_sae=4 * x.shape[1], k=32,
                                   total_samples=3 * split, batch_size=512, seed=0)
        with torch.no_grad():
            held = x[split:]
            rec = sae.decode(sae.encode(held))
            fve = 1 - (held - rec).pow(2).sum() / (held - held.mean(0)).pow(2).sum()
        results[L] = {"quick_sae_fve": round(fve.item(), 4), "probe_acc": [round(a, 3) for a in probe[L]],
                      "mean_norm": round(x.norm(dim=-1).mean().item(), 2)}
        print(L, results[L], file=sys.stderr, flush=True)
    from yapo_fast.atomic import write_text_atomic
    write_text_atomic(args.out, json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
