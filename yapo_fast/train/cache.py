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

from ..chat import format_prompt, prompt_and_response_ids
from ..errors import YapoFastError
from .lean import DecoderRunner, forward_from_layer


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


def pad_ids(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.long, device=device)


def pad_states(states: list[torch.Tensor]) -> torch.Tensor:
    n = max(s.shape[0] for s in states)
    out = states[0].new_zeros(len(states), n, states[0].shape[1])
    for i, s in enumerate(states):
        out[i, : s.shape[0]] = s
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
    """A batch laid out for forward_from_layer: B prompts, then 2B responses (chosen, rejected)."""

    hp: torch.Tensor  # (B, Pmax, d) layer-L output on the prompts
    p_lens: torch.Tensor  # (B,)
    hr: torch.Tensor  # (2B, Rmax, d)
    r_lens: torch.Tensor  # (2B,)
    targets: torch.Tensor  # (2B, Rmax)
    ref: torch.Tensor  # (2B,) reference log-probs
    codes_p: dict | None  # sparse codes with rows in the flattened (B*Pmax) layout
    codes_r: dict | None  # rows in the flattened (2B*Rmax) layout


def _shift_codes(parts: list[tuple[dict, int]]) -> dict[str, torch.Tensor]:
    rows = torch.cat([c["rows"].long() + off for c, off in parts])
    return {"rows": rows, "cols": torch.cat([c["cols"].long() for c, _ in parts]),
            "vals": torch.cat([c["vals"] for c, _ in parts])}


def assemble(cache: ExampleCache, indices: list[int], device) -> Batch:
    ex = [cache.get(i) for i in indices]
    B = len(ex)
    hp = pad_states([e["hp"] for e in ex]).to(device)
    responses = [e["hc"] for e in ex] + [e["hr"] for e in ex]
    hr = pad_states(responses).to(device)
    p_lens = torch.tensor([e["hp"].shape[0] for e in ex], device=device)
    r_lens = torch.tensor([r.shape[0] for r in responses], device=device)
    targets, _ = pad_ids([e["tc"].tolist() for e in ex] + [e["tr"].tolist() for e in ex], device)
    ref = torch.cat([torch.stack([e["ref"][0] for e in ex]), torch.stack([e["ref"][1] for e in ex])]).to(device)
    codes_p = codes_r = None
    if "p_rows" in ex[0]:
        p_max, r_max = hp.shape[1], hr.shape[1]
        get = lambda e, k: {"rows": e[f"{k}_rows"], "cols": e[f"{k}_cols"], "vals": e[f"{k}_vals"]}  # noqa: E731
        codes_p = {k: t.to(device) for k, t in _shift_codes([(get(e, "p"), i * p_max) for i, e in enumerate(ex)]).items()}
        parts = [(get(e, "c"), i * r_max) for i, e in enumerate(ex)] + [(get(e, "r"), (B + i) * r_max) for i, e in enumerate(ex)]
        codes_r = {k: t.to(device) for k, t in _shift_codes(parts).items()}
    return Batch(hp, p_lens, hr, r_lens, targets, ref, codes_p, codes_r)


@torch.no_grad()
def build_cache(runner: DecoderRunner, tokens: list[Tokens], indices: list[int], layer: int, *, sae=None,
                batch_size: int = 8, max_memory_bytes: int | None = None, spill_dir=None,
                progress: bool = True) -> ExampleCache:
    """Run layers 0..L once per pair (the prompt once for both responses), then layers L+1..N
    unsteered for the reference log-probs; keep what every later step needs."""
    cache = ExampleCache(max_memory_bytes, spill_dir)
    device = runner.device
    bar = tqdm(total=len(indices), desc=f"caching layer {layer}", disable=not progress, leave=False)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        toks = [tokens[i] for i in chunk]
        B = len(chunk)
        ids_p, p_lens = pad_ids([t.prompt for t in toks], device)
        ids_r, r_lens = pad_ids([t.chosen for t in toks] + [t.rejected for t in toks], device)
        # layers 0..L: embeddings in, layer L's output out (a full forward's state at layer L).
        hp, hr = _layers_0_to_l(runner, layer, ids_p, p_lens, ids_r, r_lens)
        ref = forward_from_layer(runner, layer + 1, hp, p_lens, hr, r_lens, ids_r).float()
        for j, i in enumerate(chunk):
            P, Rc, Rr = int(p_lens[j]), int(r_lens[j]), int(r_lens[B + j])
            entry = {"hp": hp[j, :P].float().cpu().clone(), "hc": hr[j, :Rc].float().cpu().clone(),
                     "hr": hr[B + j, :Rr].float().cpu().clone(),
                     "tc": ids_r[j, :Rc].cpu().clone(), "tr": ids_r[B + j, :Rr].cpu().clone(),
                     "ref": torch.stack([ref[j], ref[B + j]]).cpu()}
            if sae is not None:
                for key, h in (("p", entry["hp"]), ("c", entry["hc"]), ("r", entry["hr"])):
                    for name, t in sparse_codes(sae, h.to(sae.device)).items():
                        entry[f"{key}_{name}"] = t.cpu()
            cache.put(i, entry)
        bar.update(B)
    bar.close()
    return cache


def _layers_0_to_l(runner: DecoderRunner, layer: int, ids_p, p_lens, ids_r, r_lens):
    from .lean import prompt_allowed, response_allowed

    B, p_max = ids_p.shape
    r_max = ids_r.shape[1]
    hp = runner.embed(ids_p)
    pos_p = torch.arange(p_max, device=hp.device)[None].expand(B, -1)
    hp, kv = runner.run(hp, pos_p, prompt_allowed(p_lens, p_max), 0, layer + 1, record=True)
    p_lens2 = torch.cat([p_lens, p_lens])
    prefix = {i: (torch.cat([k, k]), torch.cat([v, v])) for i, (k, v) in kv.layers.items()}
    pos_r = p_lens2[:, None] + torch.arange(r_max, device=hp.device)[None]
    hr, _ = runner.run(runner.embed(ids_r), pos_r, response_allowed(p_lens2, r_lens, p_max, r_max), 0, layer + 1,
                       prefix=prefix)
    return hp, hr
