"""Activation index: for every SAE latent, its top-N activating tokens in a corpus, with their windows.

Built once per (model, SAE, layer, corpus, settings) and cached on disk, keyed by the SAE's
weights_hash() and a hash of everything else that changes the result. The build streams: the
corpus goes through the model in batches (the forward stops at layer L), each batch is encoded by
the SAE, and a running top-N per latent is merged with the batch's own top-N. Memory is
O(batch_tokens x d_sae + d_sae x N); the full tokens x d_sae activation matrix never exists.

Position 0 of every sequence is left out of the index: it is an attention sink whose residual
norm is far larger than anywhere else, so it would top every latent without meaning anything.

The corpus is `yapo_fast/assets/data/corpus_sample/` (WikiText-2, Alice, Tiny Shakespeare; see its
README) plus chat text: the shipped BiPO test questions with their two answers, through the
model's chat template.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from yapo_fast.atomic import atomic_path
from yapo_fast.errors import YapoFastError
from yapo_fast.model import cache_dir, decoder_layers, model_identity

CORPUS_DIR = Path(__file__).resolve().parent.parent / "assets" / "data" / "corpus_sample"
INDEX_FORMAT = 1


# ---- corpus ----------------------------------------------------------------------------------
def detokenize(text: str) -> str:
    """Undo the corpus's source tokenisation: ' ,' -> ',', ' @-@ ' -> '-', "do n't" -> "don't"."""
    text = re.sub(r" @(.)@ ", r"\1", text)
    text = re.sub(r" ([,.;:!?)\]}'])", r"\1", text)
    text = re.sub(r"([(\[{]) ", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    return text


def default_documents(tokenizer, chat_per_behaviour: int = 40) -> list[tuple[str, str, bool]]:
    """(source name, text, is_chat) documents: corpus sample files and templated BiPO chats."""
    from yapo_fast.chat import format_prompt
    from yapo_fast.data.pairs import BEHAVIOURS, bipo_csv_path, load_pairs

    docs = [(p.stem, detokenize(p.read_text(encoding="utf-8")), False) for p in sorted(CORPUS_DIR.glob("*.txt"))]
    per_behaviour = {b: load_pairs(bipo_csv_path(b, "test"), limit=chat_per_behaviour) for b in BEHAVIOURS}
    for i in range(chat_per_behaviour):  # interleaved, so a small token budget still sees every behaviour
        for behaviour, pairs in per_behaviour.items():
            if i < len(pairs):
                answer = pairs[i].chosen if i % 2 == 0 else pairs[i].rejected
                docs.append((f"chat:{behaviour}", format_prompt(tokenizer, pairs[i].prompt) + answer, True))
    return docs


def token_sequences(
    tokenizer, docs: list[tuple[str, str, bool]], *, seq_len: int, max_tokens: int, chat_fraction: float = 0.25
):
    """Cut documents into (n_seq, seq_len) token ids with a validity mask and one source per row.

    Plain documents are tokenised whole and cut into consecutive windows, taken round-robin over
    the documents so every source contributes; chat documents are one row each (the end of a
    long one is cut, a short one padded and masked). About `chat_fraction` of the token budget
    goes to chat rows."""
    if seq_len < 2 or max_tokens < seq_len:
        raise YapoFastError(f"need seq_len >= 2 and max_tokens >= seq_len, got {seq_len}, {max_tokens}")
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    rows, masks, sources = [], [], []
    chat_budget = int(max_tokens * chat_fraction) // seq_len
    plain_budget = max_tokens // seq_len - min(chat_budget, sum(1 for d in docs if d[2]))
    chunks_per_doc = []
    for name, text, is_chat in docs:
        if is_chat:
            continue
        ids = _tokenize_long(tokenizer, text)
        chunks_per_doc.append([(name, ids[s : s + seq_len]) for s in range(0, len(ids) - seq_len + 1, seq_len)])
    for step in range(max((len(c) for c in chunks_per_doc), default=0)):
        for chunks in chunks_per_doc:
            if step < len(chunks) and len(rows) < plain_budget:
                name, ids = chunks[step]
                rows.append(ids), masks.append([True] * seq_len), sources.append(name)
    for name, text, is_chat in docs:
        if is_chat and len(rows) < max_tokens // seq_len:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len]
            rows.append(ids + [pad] * (seq_len - len(ids)))
            masks.append([True] * len(ids) + [False] * (seq_len - len(ids)))
            sources.append(name)
    if not rows:
        raise YapoFastError(f"the corpus gave no sequence of {seq_len} tokens: give longer documents")
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(masks, dtype=torch.bool), sources


def _tokenize_long(tokenizer, text: str, piece_chars: int = 4000) -> list[int]:
    """Token ids of a long text, tokenised in line-aligned pieces (a tokenizer warns about, and
    some refuse, inputs longer than the model's context)."""
    ids, piece = [], ""
    for line in text.splitlines(keepends=True):
        if piece and len(piece) + len(line) > piece_chars:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
            piece = ""
        piece += line
    if piece:
        ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


# ---- streaming top-N -------------------------------------------------------------------------
class TopNAccumulator:
    """Running top-N activations per latent over a stream of (tokens x d_sae) activation blocks,
    plus per-latent firing counts and activation sums (for frequency and mean)."""

    def __init__(self, d_sae: int, n: int):
        if n < 1:
            raise YapoFastError(f"top-N needs N >= 1, got {n}")
        self.n = n
        self.values = torch.full((d_sae, n), float("-inf"))
        self.positions = torch.full((d_sae, n), -1, dtype=torch.int64)
        self.fired = torch.zeros(d_sae, dtype=torch.int64)
        self.sums = torch.zeros(d_sae, dtype=torch.float64)
        self.n_tokens = 0

    def update(self, acts: torch.Tensor, positions: torch.Tensor) -> None:
        """acts: (T, d_sae) activations of T tokens; positions: (T,) their global token positions."""
        acts = acts.detach().to("cpu", torch.float32)
        if acts.shape[0] == 0:
            return
        self.fired += (acts > 0).sum(0)
        self.sums += acts.sum(0, dtype=torch.float64)
        self.n_tokens += acts.shape[0]
        k = min(self.n, acts.shape[0])
        top_vals, top_rows = acts.T.topk(k, dim=1)  # (d_sae, k)
        vals = torch.cat([self.values, top_vals], dim=1)
        pos = torch.cat([self.positions, positions.to(torch.int64)[top_rows]], dim=1)
        self.values, order = vals.topk(self.n, dim=1)
        self.positions = pos.gather(1, order)


# ---- the index ------------------------------------------------------------------------------
@dataclass
class ActivationIndex:
    tokens: torch.Tensor  # (n_seq, seq_len) int64 token ids
    mask: torch.Tensor  # (n_seq, seq_len) bool: real tokens
    sources: list[str]  # one per row
    values: torch.Tensor  # (d_sae, N) top activations, descending (-inf / <= 0 where fewer fired)
    positions: torch.Tensor  # (d_sae, N) flat positions row * seq_len + col (-1: none)
    frequency: torch.Tensor  # (d_sae,) fraction of indexed tokens where the latent is > 0
    mean_activation: torch.Tensor  # (d_sae,) mean activation over all indexed tokens
    n_tokens: int
    meta: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def top(self, latent: int, n: int | None = None) -> list[tuple[float, int, int]]:
        """(activation, row, column) of the latent's top activations that fired (> 0), strongest first."""
        out = []
        for v, p in zip(self.values[latent].tolist(), self.positions[latent].tolist()):
            if p < 0 or not v > 0:
                break
            out.append((v, p // self.seq_len, p % self.seq_len))
        return out[:n]

    def contexts(self, latent: int, decode, *, n: int = 8, left: int = 12, right: int = 4) -> list[dict]:
        """Top contexts of a latent: token strings in a window, the activating token's position in it."""
        out = []
        for value, row, col in self.top(latent, n):
            lo, hi = max(0, col - left), min(self.seq_len, col + right + 1)
            keep = [c for c in range(lo, hi) if bool(self.mask[row, c])]
            ids = self.tokens[row, keep].tolist()
            out.append(
                {
                    "activation": value,
                    "source": self.sources[row],
                    "tokens": [decode(i) for i in ids],
                    "highlight": keep.index(col),
                }
            )
        return out

    # ---- files ------------------------------------------------------------------------------
    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        names = sorted(set(self.sources))
        tensors = {
            "tokens": self.tokens.contiguous(),
            "mask": self.mask.to(torch.uint8).contiguous(),
            "source_ids": torch.tensor([names.index(s) for s in self.sources], dtype=torch.int64),
            "values": self.values.contiguous(),
            "positions": self.positions.contiguous(),
            "frequency": self.frequency.contiguous(),
            "mean_activation": self.mean_activation.contiguous(),
        }
        header = {"format": INDEX_FORMAT, "source_names": names, "n_tokens": self.n_tokens, "meta": self.meta}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"yapo_fast_index": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: Path) -> "ActivationIndex":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["yapo_fast_index"])
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # a corrupt cache file: say so, the caller rebuilds or the user deletes it
            raise YapoFastError(
                f"activation index {path} is unreadable ({type(exc).__name__}: {exc}); delete it and it will be rebuilt"
            ) from exc
        if header.get("format") != INDEX_FORMAT:
            raise YapoFastError(f"activation index {path} has format {header.get('format')}, expected {INDEX_FORMAT}")
        names = header["source_names"]
        return cls(
            tokens=t["tokens"],
            mask=t["mask"].bool(),
            sources=[names[i] for i in t["source_ids"].tolist()],
            values=t["values"],
            positions=t["positions"],
            frequency=t["frequency"],
            mean_activation=t["mean_activation"],
            n_tokens=int(header["n_tokens"]),
            meta=header["meta"],
        )


class _StopForward(Exception):
    """Raised by the layer-L hook: nothing after layer L is needed for the index."""


def layer_states(
    model, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Decoder layer `layer`'s output hidden states for a batch, without running the later layers."""
    seen = []

    def hook(_module, _inputs, output):
        seen.append((output if isinstance(output, torch.Tensor) else output[0]).detach())
        raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(
                input_ids=input_ids.to(model.device),
                attention_mask=None if attention_mask is None else attention_mask.to(model.device).long(),
            )
    except _StopForward:
        pass
    finally:
        handle.remove()
    return seen[0]


def build_activation_index(
    model,
    sae,
    layer: int,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    sources: list[str],
    *,
    top_n: int = 16,
    batch_size: int = 16,
    skip_first: bool = True,
    progress: bool = True,
) -> ActivationIndex:
    """Stream `tokens` through the model up to `layer`, encode with `sae`, keep the top-N per latent."""
    acc = TopNAccumulator(sae.d_sae, top_n)
    n_seq, seq_len = tokens.shape
    valid = mask.clone()
    if skip_first:
        valid[:, 0] = False
    flat = torch.arange(n_seq * seq_len).reshape(n_seq, seq_len)
    for s in tqdm(range(0, n_seq, batch_size), desc=f"activation index (layer {layer})", disable=not progress):
        ids, m = tokens[s : s + batch_size], mask[s : s + batch_size]
        h = layer_states(model, layer, ids, m)
        keep = valid[s : s + batch_size]
        with torch.no_grad():
            z = sae.encode(h[keep.to(h.device)].to(sae.device))
        acc.update(z, flat[s : s + batch_size][keep])
    n = max(acc.n_tokens, 1)
    return ActivationIndex(
        tokens=tokens,
        mask=mask,
        sources=list(sources),
        values=acc.values,
        positions=acc.positions,
        frequency=(acc.fired.double() / n).float(),
        mean_activation=(acc.sums / n).float(),
        n_tokens=acc.n_tokens,
    )


def index_key(model, sae, layer: int, tokens: torch.Tensor, mask: torch.Tensor, settings: dict) -> str:
    """Cache key: SAE weights, model weights fingerprint, layer, exact token stream and settings."""
    digest = hashlib.sha256(
        json.dumps(
            {
                "format": INDEX_FORMAT,
                "sae": sae.weights_hash(),
                "layer": layer,
                "model": model_identity(model).get("fingerprint"),
                **settings,
            },
            sort_keys=True,
        ).encode()
    )
    digest.update(tokens.numpy().tobytes())
    digest.update(mask.numpy().tobytes())
    return digest.hexdigest()[:16]


def load_or_build_index(
    model,
    tokenizer,
    sae,
    layer: int,
    *,
    docs: list[tuple[str, str, bool]] | None = None,
    top_n: int = 16,
    seq_len: int = 64,
    max_tokens: int = 32768,
    batch_size: int = 16,
    cache: str | Path | None = None,
    progress: bool = True,
) -> tuple[ActivationIndex, Path]:
    """The cached index for these inputs (built and written atomically on first use) and its path."""
    docs = default_documents(tokenizer) if docs is None else docs
    tokens, mask, sources = token_sequences(tokenizer, docs, seq_len=seq_len, max_tokens=max_tokens)
    settings = {"top_n": top_n, "skip_first": True}
    key = index_key(model, sae, layer, tokens, mask, settings)
    folder = Path(cache) if cache is not None else cache_dir() / "activation-index"
    path = folder / f"{sae.weights_hash()}-L{layer}-{key}.safetensors"
    if path.exists():
        try:
            return ActivationIndex.load(path), path
        except YapoFastError:
            pass  # unreadable (e.g. disk trouble): rebuild over it
    index = build_activation_index(
        model, sae, layer, tokens, mask, sources, top_n=top_n, batch_size=batch_size, progress=progress
    )
    index.meta = {"key": key, "sae": sae.identity(), "layer": layer, "model": model_identity(model), **settings}
    index.save(path)
    return index, path
