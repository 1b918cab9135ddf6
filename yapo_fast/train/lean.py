"""Running a slice of a decoder's layers directly, with prompt sharing.

The trainer never calls the whole model per step: layers 0..L ran once (cache.py); a step runs
layers L+1..N-1 on the steered layer-L states, first on the B prompts, then on the 2B responses
(chosen and rejected) which attend to their prompt's keys and values. The LM head is applied
only where a response token is predicted. Rotary position embeddings and attention masks are
built here exactly as LlamaModel.forward builds them for right-padded batches, so the result
equals a full forward of prompt+response (tests/test_train_lean.py checks it against the naive
trainer, which does exactly that).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from yapo_fast.errors import YapoFastError
from yapo_fast.model import decoder_layers


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


@functools.lru_cache(maxsize=None)
def _cache_kwarg(module_type) -> str:
    """The name a layer's forward takes its KV cache under: transformers >= 5.2x renamed
    `past_key_values` to `cache` (the old name warns on every call and goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(module_type.forward).parameters else "past_key_values"


def _with_cache(module, kv) -> dict:
    return {_cache_kwarg(type(module)): kv}


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
            raise YapoFastError(
                f"the lean trainer runs Llama-style decoders (model.model.embed_tokens, rotary_emb, "
                f"norm, model.lm_head); {type(model).__name__} is not one"
            )
        for attr in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(cfg, attr, None):
                raise YapoFastError(
                    f"{type(model).__name__} uses {attr}, which the lean trainer does not implement: "
                    "train on a Llama/Mistral/Qwen-style model"
                )
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            raise YapoFastError(
                f"{type(model).__name__} uses sliding-window attention, which the lean trainer "
                "does not implement: train on a model with full attention (sliding_window=None)"
            )
        if "gemma" in str(getattr(cfg, "model_type", "")):
            raise YapoFastError(
                "Gemma models scale embeddings and soft-cap logits; the lean trainer runs "
                "Llama/Mistral/Qwen-style decoders only"
            )
        self.model = model
        self.layers = decoder_layers(model)
        self.n_layers = len(self.layers)
        self.embed = core.embed_tokens
        self.rotary = core.rotary_emb
        self.norm = core.norm
        self.lm_head = model.lm_head
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device
        self.split_mlp = self._check_split()

    def run(self, h, positions, allowed, start: int, end: int, prefix=None, record=False, rows=None, last_rows=None):
        """Layers start..end-1 on h (N, T, d) at `positions` (N, T); allowed (N, T, kv) bool.

        rows: flat indices (into N*T) of the real tokens; with it, the MLP of every layer runs on
        those tokens only, not on the padding (the MLP is 3/4 of a layer's multiply-adds and acts
        per position). last_rows: the flat positions whose output of layer end-1 is read; that
        layer's MLP runs there only (elsewhere the output holds the attention block's result,
        which nothing reads). Neither changes a value that is read: both are exact."""
        kv = _PrefixKV(prefix, record)
        if start >= end:
            return h, kv
        mask = _additive_mask(allowed, h.dtype)
        pos_emb = self.rotary(h, position_ids=positions)
        split = self.split_mlp and rows is not None
        for idx in range(start, end):
            layer = self.layers[idx]
            if split:
                # unique: chosen and rejected read the same last prompt token, and a repeated index
                # in index_copy would count its gradient twice
                keep = torch.unique(last_rows) if (idx == end - 1 and last_rows is not None) else rows
                h = self._layer_split(layer, h, mask, positions, kv, pos_emb, keep)
            else:
                out = layer(
                    h,
                    attention_mask=mask,
                    position_ids=positions,
                    **_with_cache(layer, kv),
                    use_cache=True,
                    position_embeddings=pos_emb,
                )
                h = out[0] if isinstance(out, tuple) else out
        return h, kv

    @staticmethod
    def _layer_split(layer, h, mask, positions, kv, pos_emb, keep):
        """A pre-norm decoder layer (attention block, then MLP block, each with its residual), the
        attention on the (N, T) rows, the MLP block on the flat positions `keep` only."""
        attn, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(h),
            attention_mask=mask,
            position_ids=positions,
            **_with_cache(layer.self_attn, kv),
            use_cache=True,
            position_embeddings=pos_emb,
        )
        h = h + attn
        flat = h.reshape(-1, h.shape[-1])
        x = flat.index_select(0, keep)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        return flat.index_copy(0, keep, x).view_as(h)

    @torch.no_grad()
    def _check_split(self) -> bool:
        """Use the split layer only where it provably is the layer: each layer's own structure
        (pre-norm attention + pre-norm MLP, as Llama, Mistral, Qwen) and its output on a small
        input equal to the layer's own forward. Anything else runs whole layers."""
        names = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
        if any(not hasattr(layer, n) for layer in self.layers for n in names):
            return False
        g = torch.Generator().manual_seed(0)
        h = torch.randn(2, 5, self.embed.weight.shape[1], generator=g).to(self.device, self.dtype)
        positions = torch.arange(5, device=self.device).expand(2, 5)
        allowed = torch.ones(5, 5, dtype=torch.bool, device=self.device).tril().expand(2, 5, 5)
        mask = _additive_mask(allowed, h.dtype)
        pos_emb = self.rotary(h, position_ids=positions)
        keep = torch.arange(10, device=self.device)
        for layer in self.layers[:2]:
            out = layer(
                h,
                attention_mask=mask,
                position_ids=positions,
                **_with_cache(layer, _PrefixKV()),
                use_cache=True,
                position_embeddings=pos_emb,
            )
            out = out[0] if isinstance(out, tuple) else out
            mine = self._layer_split(layer, h, mask, positions, _PrefixKV(), pos_emb, keep)
            if not torch.allclose(mine, out, rtol=1e-4, atol=1e-4 * float(out.abs().max())):
                return False
        return True

    LOGIT_ROWS = 256  # without autograd, the LM head runs on this many positions at a time

    def token_logprobs(self, h, targets):
        """log p(targets) from final hidden states h (M, d): norm, LM head, log-softmax. Without
        autograd (the cache pass) in chunks of positions, so that the (M x vocab) logits never
        exist at once: the same values, a bounded peak memory."""
        if not torch.is_grad_enabled() and h.shape[0] > self.LOGIT_ROWS:
            return torch.cat(
                [
                    self.token_logprobs(h[i : i + self.LOGIT_ROWS], targets[i : i + self.LOGIT_ROWS])
                    for i in range(0, h.shape[0], self.LOGIT_ROWS)
                ]
            )
        logits = self.lm_head(self.norm(h)).float()
        return -F.cross_entropy(logits, targets, reduction="none")


@dataclass
class Layout:
    """Pairs packed into rows without padding between them: each row of `hp` holds several prompts
    back to back, the matching row of `hr` their chosen and rejected responses. Masks keep every
    token to its own prompt and its own response's causal past, and rotary positions restart per
    sequence, so each response sees exactly what it sees in a forward of prompt+response alone."""

    p_slots: list  # per pair: (row, offset, length) in the prompt rows
    r_slots: list  # per response (B chosen, then B rejected): (row, offset, length)
    pos_p: torch.Tensor  # (G, Lp) rotary positions
    pos_r: torch.Tensor  # (G, Lr)
    allowed_p: torch.Tensor  # (G, Lp, Lp)
    allowed_r: torch.Tensor  # (G, Lr, Lp + Lr)
    first_rows: torch.Tensor  # (2B,) flat prompt-row index of each response's pair's last prompt token
    pred_rows: torch.Tensor  # (M,) flat response-row index of positions that predict a next response token
    pred_resp: torch.Tensor  # (M,) which response each of them belongs to
    valid_p: torch.Tensor  # flat (G*Lp) indices of real prompt tokens (not padding)
    valid_r: torch.Tensor  # flat (G*Lr) indices of real response tokens

    @property
    def n_rows(self):
        return self.pos_p.shape[0]


def make_layout(p_lens: list[int], r_lens: list[int], device, pack_tokens: int = 256) -> Layout:
    """p_lens: B prompt lengths; r_lens: 2B response lengths (chosen then rejected). Pairs are packed
    greedily in order into rows of at most `pack_tokens` prompt+response tokens (one pair at least)."""
    B = len(p_lens)
    rows, cur, cur_tokens = [], [], 0
    for i in range(B):
        n = p_lens[i] + r_lens[i] + r_lens[B + i]
        if cur and cur_tokens + n > pack_tokens:
            rows.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += n
    rows.append(cur)
    G = len(rows)
    p_slots, r_slots = [None] * B, [None] * (2 * B)
    lp = lr = 0
    for g, members in enumerate(rows):
        off = 0
        for i in members:
            p_slots[i] = (g, off, p_lens[i])
            off += p_lens[i]
        lp = max(lp, off)
        off = 0
        for j in [*members, *[B + i for i in members]]:
            r_slots[j] = (g, off, r_lens[j])
            off += r_lens[j]
        lr = max(lr, off)
    pos_p = torch.zeros(G, lp, dtype=torch.long)
    seg_p = torch.full((G, lp), -1, dtype=torch.long)
    pos_r = torch.zeros(G, lr, dtype=torch.long)
    pair_r = torch.full((G, lr), -2, dtype=torch.long)
    seg_r = torch.full((G, lr), -1, dtype=torch.long)
    first_rows, pred_rows, pred_resp = [], [], []
    for i, (g, off, n) in enumerate(p_slots):
        pos_p[g, off : off + n] = torch.arange(n)
        seg_p[g, off : off + n] = i
    for j, (g, off, n) in enumerate(r_slots):
        pair = j % B
        pos_r[g, off : off + n] = p_lens[pair] + torch.arange(n)
        pair_r[g, off : off + n] = pair
        seg_r[g, off : off + n] = j
        pg, poff, pn = p_slots[pair]
        first_rows.append(pg * lp + poff + pn - 1)
        pred_rows.extend(range(g * lr + off, g * lr + off + n - 1))
        pred_resp.extend([j] * (n - 1))
    causal_p = pos_p[:, None, :] <= pos_p[:, :, None]
    allowed_p = (seg_p[:, :, None] == seg_p[:, None, :]) & (seg_p[:, None, :] >= 0) & causal_p
    to_prompt = pair_r[:, :, None] == seg_p[:, None, :]
    to_resp = (
        (seg_r[:, :, None] == seg_r[:, None, :]) & (seg_r[:, None, :] >= 0) & (pos_r[:, None, :] <= pos_r[:, :, None])
    )
    t = lambda x: torch.as_tensor(x, dtype=torch.long).to(device)  # noqa: E731
    return Layout(
        p_slots,
        r_slots,
        pos_p.to(device),
        pos_r.to(device),
        allowed_p.to(device),
        torch.cat([to_prompt, to_resp], dim=2).to(device),
        t(first_rows),
        t(pred_rows),
        t(pred_resp),
        torch.nonzero(seg_p.reshape(-1) >= 0)[:, 0].to(device),
        torch.nonzero(seg_r.reshape(-1) >= 0)[:, 0].to(device),
    )


def scatter_rows(parts: list[torch.Tensor], slots, n_rows: int, length: int) -> torch.Tensor:
    """Per-sequence states (n_i, d) placed at their (row, offset) slots of a (G, length, d) tensor."""
    out = parts[0].new_zeros(n_rows, length, parts[0].shape[-1])
    for x, (g, off, n) in zip(parts, slots):
        out[g, off : off + n] = x
    return out


def gather_rows(x: torch.Tensor, slots) -> list[torch.Tensor]:
    return [x[g, off : off + n] for g, off, n in slots]


def forward_from_layer(runner: DecoderRunner, start: int, hp, hr, layout: Layout, targets_first, targets_pred):
    """Summed response log-probs of the 2B responses (B chosen then B rejected) given the inputs of
    layer `start` on the packed prompts (hp: G x Lp x d) and responses (hr: G x Lr x d).

    targets_first: (2B,) each response's first token; targets_pred: (M,) the token each
    layout.pred_rows position predicts. The prompt rows run once; the responses attend to their
    keys and values; the LM head runs only at the 2B + M predicting positions, and the last layer's
    MLP only there too (its other outputs are never read; its keys and values come before the MLP)."""
    end = runner.n_layers
    out_p, kv = runner.run(
        hp, layout.pos_p, layout.allowed_p, start, end, record=True, rows=layout.valid_p, last_rows=layout.first_rows
    )
    first = runner.token_logprobs(out_p.reshape(-1, out_p.shape[-1])[layout.first_rows], targets_first)
    if layout.pred_rows.numel() == 0:
        return first
    out_r, _ = runner.run(
        hr,
        layout.pos_r,
        layout.allowed_r,
        start,
        end,
        prefix=kv.layers,
        rows=layout.valid_r,
        last_rows=layout.pred_rows,
    )
    lp = runner.token_logprobs(out_r.reshape(-1, out_r.shape[-1])[layout.pred_rows], targets_pred)
    return first + torch.zeros_like(first).index_add(0, layout.pred_resp, lp)
