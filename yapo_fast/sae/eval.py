"""`yapo-fast sae eval`: how good is an SAE on held-out text of its model?

- fraction of variance explained: 1 - sum ||h - SAE(h)||^2 / sum ||h - mean(h)||^2 over all
  held-out tokens (position 0 of each sequence excluded: SmolLM2's attention-sink token has a
  residual norm ~100x the others and is left alone by steering's error term anyway);
- mean L0: active latents per token;
- dead latents: fraction of latents that never fire on the held-out tokens;
- LM loss increase: next-token cross-entropy with layer L's output replaced by the SAE's
  reconstruction (positions >= 1) minus the clean cross-entropy, on the same tokens.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from yapo_fast.errors import YapoFastError


def _batches(sequences, size):
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for b in range(0, len(order), size):
        yield [sequences[i] for i in order[b : b + size]]


@torch.no_grad()
def evaluate_sae(
    model,
    sae,
    sequences: list[list[int]],
    *,
    pad_id: int,
    layer: int | None = None,
    batch_size: int = 8,
    loss: bool = True,
    progress: bool = True,
) -> dict:
    """Metrics of `sae` at decoder layer `layer` (default sae.layer) over token sequences."""
    from tqdm.auto import tqdm

    from yapo_fast.model import check_layer, decoder_layers
    from yapo_fast.sae.train import layer_activations

    layer = sae.layer if layer is None else layer
    if layer is None:
        raise YapoFastError("the SAE names no layer; pass --layer")
    check_layer(model, layer)
    if sae.d_in != model.config.hidden_size:
        raise YapoFastError(
            f"SAE d_in {sae.d_in} != model d_model {model.config.hidden_size}: wrong SAE for this model"
        )
    sae32 = sae.to(dtype=torch.float32)
    block = decoder_layers(model)[layer]
    n_tok, sq_err, sum_h, sum_sq, l0_sum = 0, 0.0, None, 0.0, 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    ce_clean = ce_spliced = 0.0
    n_pred = 0
    mode = {"splice": False}

    def hook(_m, _i, output):
        h = output if isinstance(output, torch.Tensor) else output[0]
        if not mode["splice"]:
            captured.append(h.detach())
            return None
        rec = sae32.decode(sae32.encode(h.float())).to(h.dtype)
        rec[:, 0] = h[:, 0]  # position 0 (attention sink) kept, as in training
        return rec if isinstance(output, torch.Tensor) else (rec, *output[1:])

    handle = block.register_forward_hook(hook)
    total = sum(len(s) for s in sequences)
    try:
        with tqdm(
            total=total, desc="sae eval", unit="tok", unit_scale=True, disable=not progress, file=sys.stderr
        ) as bar:
            for batch in _batches(sequences, batch_size):
                width = max(len(s) for s in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, s in enumerate(batch):
                    ids[i, : len(s)] = torch.tensor(s)
                    mask[i, : len(s)] = 1
                keep = mask.bool().clone()
                keep[:, 0] = False
                captured: list[torch.Tensor] = []
                mode["splice"] = False
                if loss:
                    logits = model(input_ids=ids, attention_mask=mask).logits
                    h = captured[0][keep].float()
                else:  # the forward stops at layer L
                    handle.remove()
                    h = layer_activations(model, layer, batch, pad_id)
                    handle = block.register_forward_hook(hook)
                z = sae32.encode(h)
                rec = sae32.decode(z)
                n_tok += len(h)
                sq_err += (h - rec).pow(2).sum().item()
                sum_h = h.sum(0) if sum_h is None else sum_h + h.sum(0)
                sum_sq += h.pow(2).sum().item()
                active = z > 0
                l0_sum += active.sum().item()
                fired |= active.any(0)
                if loss:
                    mode["splice"] = True
                    logits_s = model(input_ids=ids, attention_mask=mask).logits
                    # predict token t+1 from position t, for positions t >= 1 with a real next token
                    tgt_mask = keep[:, :-1] & mask[:, 1:].bool()
                    tgt = ids[:, 1:][tgt_mask]
                    ce_clean += torch.nn.functional.cross_entropy(
                        logits[:, :-1][tgt_mask].float(), tgt, reduction="sum"
                    ).item()
                    ce_spliced += torch.nn.functional.cross_entropy(
                        logits_s[:, :-1][tgt_mask].float(), tgt, reduction="sum"
                    ).item()
                    n_pred += len(tgt)
                bar.update(sum(len(s) for s in batch))
    finally:
        handle.remove()
    if n_tok == 0:
        raise YapoFastError("no held-out tokens to evaluate on (sequences too short?)")
    total_var = sum_sq - sum_h.pow(2).sum().item() / n_tok
    out = {
        "tokens": n_tok,
        "variance_explained": 1.0 - sq_err / total_var,
        "mse_per_token": sq_err / n_tok,
        "mean_l0": l0_sum / n_tok,
        "dead_fraction": 1.0 - fired.float().mean().item(),
        "d_sae": sae.d_sae,
        "layer": layer,
        "kind": sae.kind,
    }
    if loss:
        out.update(
            ce_clean=ce_clean / n_pred,
            ce_with_sae=ce_spliced / n_pred,
            loss_increase=(ce_spliced - ce_clean) / n_pred,
            predicted_tokens=n_pred,
        )
    return out


def run_eval(args) -> dict:
    from yapo_fast import load_sae
    from yapo_fast.atomic import write_text_atomic
    from yapo_fast.data.text_source import TextMixture, token_sequences
    from yapo_fast.model import load_model
    from yapo_fast.sae.train import chat_answers_for

    t0 = time.time()
    if args.threads < 1:
        raise YapoFastError(f"--threads {args.threads}: need at least 1")
    torch.set_num_threads(args.threads)  # 1 by default: see `sae train --threads`
    sae = load_sae(args.sae)
    layer = sae.layer if args.layer is None else args.layer
    model, tok = load_model(args.model)
    mixture = TextMixture.parse(args.mix if args.mix else sae.metadata.get("text_mixture", "corpus=0.7,chat=0.3"))
    work = Path(args.out).parent if args.out else Path(".")
    answers = None
    if mixture.chat > 0:
        answers = chat_answers_for(model, tok, args.model, work, split="heldout", progress=not args.quiet)
    sequences, stats = token_sequences(
        tok,
        split="heldout",
        mixture=mixture,
        ctx=args.ctx,
        max_tokens=args.tokens,
        seed=args.seed,
        chat_answers=answers,
    )
    result = evaluate_sae(
        model,
        sae,
        sequences,
        pad_id=tok.pad_token_id,
        layer=layer,
        batch_size=args.forward_batch,
        loss=not args.no_loss,
        progress=not args.quiet,
    )
    result.update(
        sae=str(args.sae or "default"),
        sae_name=sae.name,
        model=sae.model_name,
        text=stats,
        seconds=round(time.time() - t0, 1),
    )
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    return result


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="variance explained, L0, dead latents and LM loss increase on held-out text")
    p.add_argument("--sae", default=None, help="SAE directory (default: the shipped default SAE)")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--layer", type=int, default=None, help="default: the SAE's own layer")
    p.add_argument("--tokens", type=int, default=8000, help="held-out tokens")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--mix", default=None, help="held-out text mixture (default: the SAE's training mixture)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--forward-batch", type=int, default=8)
    p.add_argument("--no-loss", action="store_true", help="skip the LM loss (two full forwards per batch)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as for sae train)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    p.set_defaults(func=run_eval)
