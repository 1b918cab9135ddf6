"""Held-out preference margin: does a vector move the behaviour it was trained for, on pairs it never saw?

For each held-out pair (prompt, chosen, rejected) the margin is

    margin = log p(chosen | prompt) - log p(rejected | prompt)      (summed over the response tokens)

computed unsteered and steered at each multiplier m. The effect at m is the mean over pairs of
margin_m - margin_0, paired on the same items (a 95% normal interval of the paired differences), and
`moved` is the fraction of pairs whose margin moves the intended way (up for m > 0, down for m < 0).
This is the quantity the DPO objective trains, read on unseen questions, in both directions.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from yapo_fast.chat import format_prompt, prompt_and_response_ids
from yapo_fast.errors import YapoFastError
from yapo_fast.eval.ab import mean_ci95


@torch.no_grad()
def response_logprobs(
    model, tokenizer, prompts: list[str], responses: list[str], *, batch_size: int = 8
) -> torch.Tensor:
    """(n,) float64: sum over each response's tokens of log p(token | prompt, earlier response tokens).

    Prompts go through the chat template; rows are right-padded (causal attention: padding after a
    row's last token cannot change its logits), sorted by length so little padding is computed."""
    if len(prompts) != len(responses):
        raise YapoFastError(f"{len(prompts)} prompts but {len(responses)} responses")
    rows = [prompt_and_response_ids(tokenizer, format_prompt(tokenizer, p), r) for p, r in zip(prompts, responses)]
    if any(not r for _, r in rows):
        raise YapoFastError("a response tokenized to nothing: the margin needs a non-empty chosen and rejected answer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    out = torch.empty(len(rows), dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [rows[i][0] + rows[i][1] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.double(), -1)
        for j, i in enumerate(idx):
            p_len, r_len = len(rows[i][0]), len(rows[i][1])
            targets = ids[j, p_len : p_len + r_len].to(device)
            # the logits at position t predict token t+1
            out[i] = logp[j, p_len - 1 : p_len - 1 + r_len].gather(-1, targets[:, None]).sum().item()
    return out


def pair_margins(model, tokenizer, pairs, *, batch_size: int = 8) -> torch.Tensor:
    """(n,) log p(chosen) - log p(rejected) per pair, under whatever steering hook is installed."""
    prompts = [p.prompt for p in pairs]
    chosen = response_logprobs(model, tokenizer, prompts, [p.chosen for p in pairs], batch_size=batch_size)
    rejected = response_logprobs(model, tokenizer, prompts, [p.rejected for p in pairs], batch_size=batch_size)
    return chosen - rejected


def margin_effect(steered: torch.Tensor, base: torch.Tensor, multiplier: float) -> dict:
    """Paired effect of one (vector, multiplier) against unsteered margins on the same pairs."""
    diff = steered.double() - base.double()
    delta, lo, hi = mean_ci95(diff)
    sign = 1.0 if multiplier > 0 else -1.0
    return {
        "multiplier": float(multiplier),
        "delta": delta,
        "delta_ci_low": lo,
        "delta_ci_high": hi,
        "moved": float((sign * diff > 0).double().mean()),
        "mean": float(steered.double().mean()),
        "n": int(diff.numel()),
    }


def margin_effects(
    model,
    tokenizer,
    pairs,
    vectors: dict,
    *,
    multipliers=(-1.0, 1.0),
    sae=None,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "margin",
    base: torch.Tensor | None = None,
) -> tuple[dict, torch.Tensor]:
    """({name: [effect per multiplier]}, unsteered margins) on held-out `pairs`. `base`: the
    unsteered margins of these pairs from an earlier call (measured here when None)."""
    from yapo_fast.eval.evaluate import _steered

    if not pairs:
        raise YapoFastError("no held-out pairs to measure the margin on")
    if base is None:
        base = pair_margins(model, tokenizer, pairs, batch_size=batch_size)
    out = {}
    jobs = [(name, vec, float(m)) for name, vec in vectors.items() for m in multipliers if m != 0]
    for name, vec, m in tqdm(jobs, desc=desc, disable=not progress):
        with _steered(model, vec, m, sae):
            steered = pair_margins(model, tokenizer, pairs, batch_size=batch_size)
        out.setdefault(name, []).append(margin_effect(steered, base, m))
    return out, base
