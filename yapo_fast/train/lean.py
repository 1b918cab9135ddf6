"""Running a slice of a decoder's layers directly, with prompt sharing.

The trainer never calls the whole model per step: layers 0..L ran once (cache.py); a step runs
layers L+1..N-1 on the steered layer-L states, first on the B prompts, then on the 2B responses
(chosen and rejected) which attend to their prompt's keys and values. The LM head is applied
only where a response token is predicted. Rotary position embeddings and attention masks are
built here exactly as LlamaModel.forward builds them for right-padded batches, so the result
equals a full forward of prompt+response (tests/test_trainer.py checks it against the naive
trainer, which does exactly that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import YapoFastError
from ..model import decoder_layers


class _PrefixKV:
    """The one Cache method decoder attention calls: update(k, v, layer_idx) -> full k, v.

    `prefix` holds the prompt's keys/values per layer (the response pass attends to them);
    with `record`, the keys/values of this pass are kept (the prompt pass)."""

    def __init__(self, prefix: dict | None = None, record: bool = False):
        self.prefix = prefix or {}
        self.record = record
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.record:
            self.layers[layer_idx] = (key_states, value_states)
        if layer_idx in self.prefix:
            pk, pv = self.prefix[layer_idx]
            key_states = torch.cat([pk, key_states], dim=2)
            value_states = torch.cat([pv, value_states], dim=2)
        return key_states, value_states

    def get_seq_length(self, *args, **kwargs):  # asked by some attention variants; unused here
        return 0


def _additive_mask(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """(N, q, kv) bool -> (N, 1, q, kv) additive float mask (works for eager and sdpa attention).
    finfo.min, not -inf: padded query rows that see nothing stay finite."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


class DecoderRunner:
    """Direct access to a Llama-style decoder: embeddings, layers, final norm, LM head."""

    def __init__(self, model):
        core = getattr(model, "model", None)
        cfg = model.config
        needed = ("embed_tokens", "rotary_emb", "norm")
        if core is None or any(not hasattr(core, n) for n in needed) or not hasattr(model, "lm_head"):
            raise YapoFastError(f"the lean trainer runs Llama-style decoders (model.model.embed_tokens, rotary_emb, "
                                f"norm, model.lm_head); {type(model).__name__} is not one")
        for attr in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(cfg, attr, None):
                raise YapoFastError(f"{type(model).__name__} uses {attr}, which the lean trainer does not implement: "
                                    "train on a Llama/Mistral/Qwen-style model")
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            raise YapoFastError(f"{type(model).__name__} uses sliding-window attention, which the lean trainer "
                                "does not implement: train on a model with full attention (sliding_window=None)")
        if "gemma" in str(getattr(cfg, "model_type", "")):
            raise YapoFastError("Gemma models scale embeddings and soft-cap logits; the lean trainer runs "
                                "Llama/Mistral/Qwen-style decoders only")
        self.model = model
        self.layers = decoder_layers(model)
        self.n_layers = len(self.layers)
        self.embed = core.embed_tokens
        self.rotary = core.rotary_emb
        self.norm = core.norm
        self.lm_head = model.lm_head
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device

    def run(self, h, positions, allowed, start: int, end: int, prefix=None, record=False):
        """Layers start..end-1 on h (N, T, d) at `positions` (N, T); allowed (N, T, kv) bool."""
        kv = _PrefixKV(prefix, record)
        if start >= end:
            return h, kv
        mask = _additive_mask(allowed, h.dtype)
        pos_emb = self.rotary(h, position_ids=positions)
        for layer in self.layers[start:end]:
            out = layer(h, attention_mask=mask, position_ids=positions, past_key_values=kv, use_cache=True,
                        position_embeddings=pos_emb)
            h = out[0] if isinstance(out, tuple) else out
        return h, kv

    def token_logprobs(self, h, targets):
        """log p(targets) from final hidden states h (M, d): norm, LM head, log-softmax."""
        logits = self.lm_head(self.norm(h)).float()
        return -F.cross_entropy(logits, targets, reduction="none")


def prompt_allowed(p_lens: torch.Tensor, p_max: int) -> torch.Tensor:
    ar = torch.arange(p_max, device=p_lens.device)
    causal = ar[None, :] <= ar[:, None]  # (q, kv)
    return causal[None] & (ar[None, None, :] < p_lens[:, None, None])


def response_allowed(p_lens: torch.Tensor, r_lens: torch.Tensor, p_max: int, r_max: int) -> torch.Tensor:
    """Response queries see their prompt's real tokens and the causal past of their response."""
    ap = torch.arange(p_max, device=p_lens.device)
    ar = torch.arange(r_max, device=p_lens.device)
    to_prompt = (ap[None, :] < p_lens[:, None])[:, None, :].expand(-1, r_max, -1)
    to_resp = (ar[None, :] <= ar[:, None])[None] & (ar[None, None, :] < r_lens[:, None, None])
    return torch.cat([to_prompt, to_resp], dim=2)


def forward_from_layer(runner: DecoderRunner, start: int, hp, p_lens, hr, r_lens, targets):
    """Summed response log-probs of 2B sequences (B chosen then B rejected) given the inputs of
    layer `start` for the B prompts (hp: B x Pmax x d) and the 2B responses (hr: 2B x Rmax x d).

    targets: (2B, Rmax) response token ids (padding arbitrary). Returns (2B,) sums over response
    tokens of log p(token | prompt, previous response tokens)."""
    B, p_max = hp.shape[:2]
    r_max = hr.shape[1]
    end = runner.n_layers
    pos_p = torch.arange(p_max, device=hp.device)[None].expand(B, -1)
    out_p, kv = runner.run(hp, pos_p, prompt_allowed(p_lens, p_max), start, end, record=True)
    # The first response token is predicted from the prompt's last position (shared by both).
    last = out_p[torch.arange(B, device=hp.device), p_lens - 1]
    first = runner.token_logprobs(torch.cat([last, last]), targets[:, 0])
    if r_max == 1 and bool((r_lens == 1).all()):
        return first
    p_lens2 = torch.cat([p_lens, p_lens])
    prefix = {i: (torch.cat([k, k]), torch.cat([v, v])) for i, (k, v) in kv.layers.items()}
    pos_r = p_lens2[:, None] + torch.arange(r_max, device=hp.device)[None]
    out_r, _ = runner.run(hr, pos_r, response_allowed(p_lens2, r_lens, p_max, r_max), start, end, prefix=prefix)
    valid = torch.arange(r_max - 1, device=hp.device)[None] < (r_lens - 1)[:, None]  # (2B, Rmax-1)
    rows = torch.nonzero(valid)[:, 0]
    lp = runner.token_logprobs(out_r[:, :-1][valid], targets[:, 1:][valid])
    return first + torch.zeros_like(first).index_add(0, rows, lp)
