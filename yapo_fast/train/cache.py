"""Everything about a training example that does not depend on v, computed once.

Per pair: the token ids (prompt through the chat template; responses tokenized apart), layer
L's output on the prompt and on both responses (layers 0..L run once, the prompt once for both
responses), the reference log-probs (the unsteered model; v = 0), and for YaPO the SAE codes of
the cached states, stored sparsely (row, latent, value): for ReLU, JumpReLU and TopK SAEs they
do not depend on v. Examples beyond `max_memory_bytes` are spilled to safetensors files on disk.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from yapo_fast.chat import format_prompt, prompt_and_response_ids
from yapo_fast.errors import YapoFastError
from yapo_fast.train.lean import DecoderRunner, Layout, forward_from_layer, gather_rows, make_layout, scatter_rows


@dataclass
class Tokens:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def tokenize_pairs(tokenizer, pairs, system: str | None = None) -> list[Tokens]:
    out = []
    for i, pair in enumerate(pairs):
        text = format_prompt(tokenizer, pair.prompt, system)
        p, c = prompt_and_response_ids(tokenizer, text, pair.chosen)
        _, r = prompt_and_response_ids(tokenizer, text, pair.rejected)
        if not p or not c or not r:
            raise YapoFastError(f"pair {i}: the prompt or a response tokenizes to no tokens: drop or fix the pair")
        out.append(Tokens(p, c, r))
    return out


def sparse_codes(sae, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """Non-zero SAE code entries of h (T, d) as (row, col, val)."""
    z = sae.encode(h.to(sae.dtype))
    rows, cols = torch.nonzero(z, as_tuple=True)
    return {"rows": rows.to(torch.int32), "cols": cols.to(torch.int32), "vals": z[rows, cols]}


class ExampleCache:
    """Per pair: ids, layer-L states, reference log-probs and (YaPO) sparse SAE codes."""

    def __init__(self, max_memory_bytes: int | None = None, spill_dir: str | Path | None = None):
        self.max_memory_bytes = max_memory_bytes
        self._spill_dir = spill_dir
        self._tmp = None
        self.entries: dict[int, dict | Path] = {}
        self.memory_bytes = 0
        self.spilled = 0

    def put(self, index: int, entry: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry.values())
        if self.max_memory_bytes is not None and self.memory_bytes + size > self.max_memory_bytes:
            from safetensors.torch import save_file

            if self._spill_dir is None and self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="yapo-fast-cache-")
            folder = Path(self._spill_dir or self._tmp.name)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"pair{index}.safetensors"
            save_file({k: v.contiguous() for k, v in entry.items()}, str(path))
            self.entries[index] = path
            self.spilled += 1
        else:
            self.entries[index] = entry
            self.memory_bytes += size

    def get(self, index: int) -> dict[str, torch.Tensor]:
        entry = self.entries[index]
        if isinstance(entry, Path):
            from safetensors.torch import load_file

            return load_file(str(entry))
        return entry

    def __contains__(self, index):
        return index in self.entries


@dataclass
class Batch:
    """A batch laid out for forward_from_layer: prompts packed into rows, responses likewise."""

    hp: torch.Tensor  # (G, Lp, d) layer-L output on the packed prompts
    hr: torch.Tensor  # (G, Lr, d) ... on the packed responses (B chosen, B rejected)
    layout: Layout
    targets_first: torch.Tensor  # (2B,)
    targets_pred: torch.Tensor  # (M,)
    ref: torch.Tensor  # (2B,) reference log-probs
    codes_p: dict | None  # sparse codes with rows in the flattened (G*Lp) layout
    codes_r: dict | None  # rows in the flattened (G*Lr) layout


def response_targets(responses: list[torch.Tensor], device):
    """First token of each response, and the tokens its later positions predict (layout order)."""
    first = torch.stack([r[0] for r in responses]).to(device)
    pred = torch.cat([r[1:] for r in responses]).to(device)
    return first, pred


def _shift_codes(parts: list[tuple[dict, int]], device) -> dict[str, torch.Tensor]:
    rows = torch.cat([c["rows"].long() + off for c, off in parts])
    return {
        "rows": rows.to(device),
        "cols": torch.cat([c["cols"].long() for c, _ in parts]).to(device),
        "vals": torch.cat([c["vals"] for c, _ in parts]).to(device),
    }


def assemble(cache: ExampleCache, indices: list[int], device, pack_tokens: int = 256) -> Batch:
    ex = [cache.get(i) for i in indices]
    prompts = [e["hp"] for e in ex]
    responses = [e["hc"] for e in ex] + [e["hr"] for e in ex]
    layout = make_layout([x.shape[0] for x in prompts], [x.shape[0] for x in responses], device, pack_tokens)
    G, lp = layout.pos_p.shape
    lr = layout.pos_r.shape[1]
    hp = scatter_rows(prompts, layout.p_slots, G, lp).to(device)
    hr = scatter_rows(responses, layout.r_slots, G, lr).to(device)
    tf, tp = response_targets([e["tc"] for e in ex] + [e["tr"] for e in ex], device)
    ref = torch.cat([torch.stack([e["ref"][0] for e in ex]), torch.stack([e["ref"][1] for e in ex])]).to(device)
    codes_p = codes_r = None
    if "p_rows" in ex[0]:
        get = lambda e, k: {"rows": e[f"{k}_rows"], "cols": e[f"{k}_cols"], "vals": e[f"{k}_vals"]}  # noqa: E731
        codes_p = _shift_codes([(get(e, "p"), g * lp + off) for e, (g, off, _) in zip(ex, layout.p_slots)], device)
        keys = [(e, "c") for e in ex] + [(e, "r") for e in ex]
        codes_r = _shift_codes([(get(e, k), g * lr + off) for (e, k), (g, off, _) in zip(keys, layout.r_slots)], device)
    return Batch(hp, hr, layout, tf, tp, ref, codes_p, codes_r)


@torch.no_grad()
def build_cache(
    runner: DecoderRunner,
    tokens: list[Tokens],
    indices: list[int],
    layer: int,
    *,
    sae=None,
    batch_size: int = 8,
    max_memory_bytes: int | None = None,
    spill_dir=None,
    progress: bool = True,
    pack_tokens: int = 256,
) -> ExampleCache:
    """Run layers 0..L once per pair (the prompt once for both responses), then layers L+1..N
    unsteered for the reference log-probs; keep what every later step needs."""
    cache = ExampleCache(max_memory_bytes, spill_dir)
    device = runner.device
    bar = tqdm(total=len(indices), desc=f"caching layer {layer}", disable=not progress, leave=False)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        toks = [tokens[i] for i in chunk]
        B = len(chunk)
        ids_p = [torch.tensor(t.prompt, dtype=torch.long) for t in toks]
        ids_r = [torch.tensor(t.chosen, dtype=torch.long) for t in toks] + [
            torch.tensor(t.rejected, dtype=torch.long) for t in toks
        ]
        layout = make_layout([len(x) for x in ids_p], [len(x) for x in ids_r], device, pack_tokens)
        G, lp = layout.pos_p.shape
        lr = layout.pos_r.shape[1]
        emb = lambda ids: runner.embed(ids.to(device))  # noqa: E731
        hp = scatter_rows([emb(x) for x in ids_p], layout.p_slots, G, lp)
        hr = scatter_rows([emb(x) for x in ids_r], layout.r_slots, G, lr)
        # layers 0..L: embeddings in, layer L's output out (a full forward's state at layer L)
        hp, kv = runner.run(hp, layout.pos_p, layout.allowed_p, 0, layer + 1, record=True, rows=layout.valid_p)
        hr, _ = runner.run(hr, layout.pos_r, layout.allowed_r, 0, layer + 1, prefix=kv.layers, rows=layout.valid_r)
        tf, tp = response_targets(ids_r, device)
        ref = forward_from_layer(runner, layer + 1, hp, hr, layout, tf, tp).float()
        states_p, states_r = gather_rows(hp, layout.p_slots), gather_rows(hr, layout.r_slots)
        for j, i in enumerate(chunk):
            entry = {
                "hp": states_p[j].float().cpu().clone(),
                "hc": states_r[j].float().cpu().clone(),
                "hr": states_r[B + j].float().cpu().clone(),
                "tc": ids_r[j].clone(),
                "tr": ids_r[B + j].clone(),
                "ref": torch.stack([ref[j], ref[B + j]]).cpu(),
            }
            if sae is not None:
                for key, h in (("p", entry["hp"]), ("c", entry["hc"]), ("r", entry["hr"])):
                    for name, t in sparse_codes(sae, h.to(sae.device)).items():
                        entry[f"{key}_{name}"] = t.cpu()
            cache.put(i, entry)
        bar.update(B)
    bar.close()
    return cache
