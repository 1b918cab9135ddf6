"""Worker-side state of the vLLM plugin (runs in each worker process): named vectors, prepared slots, and the per-step plan
that the steering op (integrations/vllm_plugin.py) reads at every decoder layer it is installed on.

One instance per process (``STATE``). Nothing here imports vLLM: the plan is built from plain
lists (request order, tokens scheduled per request, each request's extra_args), so it is tested
without an engine.

What a request asks for: integrations/vllm_requests.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from yapo_fast.errors import YapoFastError
from yapo_fast.integrations.vllm_requests import UNSET, parse_request_args

MAX_SLOTS = 1024  # prepared (vector, multiplier) pairs kept per worker


@dataclass
class NamedVector:
    vector: object  # yapo_fast.SteeringVector
    sae: object | None  # yapo_fast.SAE for yapo vectors
    multiplier: float  # default multiplier


@dataclass
class Slot:
    """One (vector, multiplier), prepared once. ``id`` is its row in the state's slot list (the
    value the per-request and per-token slot maps hold)."""

    key: tuple
    layer: int
    id: int = -1
    sparse: object | None = None  # PreparedSteer (yapo)
    group: str | None = None  # sparse slots sharing this key stack together (same SAE kind/shape/k)
    dense_add: torch.Tensor | None = None  # (d_model,) float32 m*v (bipo / caa)


@dataclass
class LayerPlan:
    """What layer L does this step. Either one vector steers every scheduled token (``uniform``:
    no index at all, the single-vector kernels), or per-token indices select rows of a dense
    table / slots of a stacked sparse batch."""

    uniform: Slot | None = None
    sparse: list = field(default_factory=list)  # [(PreparedSlots, slot_index (T,) int32, -1 elsewhere)]
    # CPU: the same sparse work as contiguous runs of tokens, one single-vector call per slot:
    # [(order (R,) int64: steered token rows sorted by slot, [(PreparedSteer, start, end), ...])]
    segments: list = field(default_factory=list)
    dense_table: torch.Tensor | None = None  # (S_dense + 1, d_model), row 0 zeros
    dense_index: torch.Tensor | None = None  # (T,) int64 into dense_table


class SteerState:
    def __init__(self):
        self.vectors: dict[str, NamedVector] = {}
        self.global_spec: tuple | None = None  # (GLOBAL_NAME-or-name, m) from yapo_fast.patch
        self.slots: dict[tuple, Slot] = {}
        self.slot_list: list[Slot] = []  # slot.id -> slot
        self.stacks: dict[tuple, tuple] = {}  # (layer, group, slot ids) -> (PreparedSlots, remap)
        self.dense_tables: dict[tuple, tuple] = {}  # (layer, slot ids) -> (table, remap)
        self.installed_layers: set[int] = set()
        self.plan: dict[int, LayerPlan] | None = None
        self.num_tokens = 0
        self.device = torch.device("cpu")
        self.sparse_layout: str | None = None  # "segments" | "stacked"; None: by device (tests force one)
        self._generation = 0  # bumped whenever slot ids change
        self._requests: dict[str, int] = {}  # request id -> slot id (-1 unsteered), for this registry
        self._req_buf = torch.empty(0, dtype=torch.int64)  # per-request slot id + 1 (0 = unsteered)
        self._token_buf = torch.empty(0, dtype=torch.int64)  # per-token slot id + 1, on self.device

    # ---- registry ----------------------------------------------------------------------------
    def register(self, name: str, vector, sae=None, multiplier: float | None = None) -> None:
        if vector.is_sparse and sae is None:
            raise YapoFastError(f"vector {name!r} is a yapo vector: it needs its SAE")
        if vector.is_sparse:
            vector.check_compatible(sae=sae)
        m = vector.multiplier if multiplier is None else float(multiplier)
        self.vectors[name] = NamedVector(vector, sae, float(m))
        self._forget(name)

    def unregister(self, name: str) -> None:
        self.vectors.pop(name, None)
        self._forget(name)
        if self.global_spec and self.global_spec[0] == name:
            self.global_spec = None

    def _forget(self, name: str) -> None:
        for key in [k for k in self.slots if k[0] == name]:
            del self.slots[key]
        self._renumber()

    def _renumber(self) -> None:
        """Slot ids changed (or what a request maps to): drop every cache keyed by them."""
        self._generation += 1
        self.slot_list = list(self.slots.values())
        for i, slot in enumerate(self.slot_list):
            slot.id = i
        self.stacks.clear()
        self.dense_tables.clear()
        self._requests.clear()

    def set_global(self, name: str | None, multiplier: float | None = None) -> None:
        if name is not None and name not in self.vectors:
            raise YapoFastError(f"no steering vector named {name!r} is registered in this worker")
        self.global_spec = None if name is None else (name, multiplier)
        self._requests.clear()  # requests without yapo arguments follow the engine-wide vector

    @property
    def active(self) -> bool:
        return bool(self.vectors)

    # ---- slots -------------------------------------------------------------------------------
    def slot(self, name: str, multiplier: float | None) -> Slot:
        nv = self.vectors.get(name)
        if nv is None:
            raise YapoFastError(f"unknown steering vector {name!r}; registered: {sorted(self.vectors)}")
        m = nv.multiplier if multiplier is None else float(multiplier)
        key = (name, m)
        slot = self.slots.get(key)
        if slot is None:
            if len(self.slots) >= MAX_SLOTS:  # many distinct multipliers: keep the slot table bounded
                self.slots.clear()
                self._renumber()
            slot = self._prepare(key, nv, m)
            slot.id = len(self.slot_list)
            self.slots[key] = slot
            self.slot_list.append(slot)
        return slot

    def _prepare(self, key, nv: NamedVector, m: float) -> Slot:
        vec = nv.vector
        if vec.is_sparse:
            from yapo_fast.kernels.sparse_steer_prepare import prepare_sparse_steer

            sae = nv.sae.to(device=self.device, dtype=torch.float32)
            prepared = prepare_sparse_steer(sae, vec.latent().to(self.device), m)
            group = f"{sae.kind}|{sae.d_in}|{sae.d_sae}|{sae.k}|{sae.weights_hash() if sae.kind == 'topk' else ''}"
            return Slot(key=key, layer=vec.layer, sparse=prepared, group=group)
        return Slot(key=key, layer=vec.layer, dense_add=(m * vec.dense().to(self.device, torch.float32)))

    def _remap(self, ids: tuple, first: int, fill: int, dtype) -> torch.Tensor:
        """Lookup table (slot id + 1) -> position of that slot among `ids` (+ first); `fill` for
        every other slot and for 0 (unsteered). Sized for every slot id the table can ever hold,
        not the slots of today: the cached table is reused in later steps, after slots of other
        vectors or layers were added, whose ids then appear in the per-token index."""
        remap = torch.full((MAX_SLOTS + 1,), fill, dtype=dtype)
        remap[torch.tensor(ids, dtype=torch.int64) + 1] = torch.arange(first, first + len(ids), dtype=dtype)
        return remap.to(self.device)

    def _stack(self, layer: int, group: str, ids: tuple):
        """The sparse slots `ids` (one SAE group at one layer) stacked, with their remap; cached
        by the set of slots, so a steady batch composition builds it once."""
        from yapo_fast.kernels.sparse_steer_prepare import stack_prepared

        key = (layer, group, ids)
        hit = self.stacks.get(key)
        if hit is None:
            if len(self.stacks) > 256:  # many distinct batch compositions: keep the cache bounded
                self.stacks.clear()
            stack = stack_prepared([self.slot_list[i].sparse for i in ids])
            hit = self.stacks[key] = (stack, self._remap(ids, 0, -1, torch.int32))
        return hit

    def _dense_table(self, layer: int, ids: tuple):
        hit = self.dense_tables.get((layer, ids))
        if hit is None:
            if len(self.dense_tables) > 256:
                self.dense_tables.clear()
            rows = [torch.zeros_like(self.slot_list[ids[0]].dense_add)] + [self.slot_list[i].dense_add for i in ids]
            hit = self.dense_tables[(layer, ids)] = (torch.stack(rows), self._remap(ids, 1, 0, torch.int64))
        return hit

    # ---- per step ----------------------------------------------------------------------------
    def spec_for(self, extra_args):
        spec = parse_request_args(extra_args)
        return self.global_spec if spec is UNSET else spec

    def slot_id_for(self, extra_args) -> int:
        spec = self.spec_for(extra_args)
        return -1 if spec is None else self.slot(*spec).id

    def request_slots(self, req_ids, extra_args_of) -> list[int]:
        """Slot id (-1 unsteered) of each request, in batch order. A request's arguments are
        parsed once (cached by request id until the registry changes); `extra_args_of(req_id)`
        is only called for requests not seen yet."""
        if len(self._requests) > max(4096, 4 * len(req_ids)):  # finished ids we were never told about
            self._requests = {rid: self._requests[rid] for rid in req_ids if rid in self._requests}
        for _ in range(2):
            generation, cache, out = self._generation, self._requests, []
            for rid in req_ids:
                s = cache.get(rid)
                if s is None:
                    s = cache[rid] = self.slot_id_for(extra_args_of(rid))
                out.append(s)
            if generation == self._generation:
                return out
            # a new slot overflowed the slot table and renumbered every slot: map again (once)
        raise YapoFastError(f"one step asks for more than {MAX_SLOTS} distinct (vector, multiplier) pairs")

    def forget_requests(self, req_ids) -> None:
        for rid in req_ids:
            self._requests.pop(rid, None)

    def build_plan(self, specs: list, tokens_per_request) -> None:
        """specs[i]: the (name, m) steering request i of this step (None: unsteered), in the
        order in which its scheduled tokens are laid out; tokens_per_request[i]: how many."""
        self.build_plan_ids([-1 if s is None else self.slot(*s).id for s in specs], tokens_per_request)

    def build_plan_ids(self, slot_ids: list[int], tokens_per_request) -> None:
        """slot_ids[i]: slot of request i (-1 unsteered) in the batch order of its scheduled
        tokens; tokens_per_request[i]: how many it has this step. Per-token indices come from
        one repeat_interleave into a persistent buffer and one gather per steered layer; a
        batch steered by a single vector needs no index at all."""
        self.plan = None
        self.num_tokens = 0
        present = set(slot_ids)
        steered_everywhere = -1 not in present
        present.discard(-1)
        if not present:
            return
        n_req = len(slot_ids)
        counts = torch.as_tensor(np.asarray(tokens_per_request)[:n_req], dtype=torch.int64)
        T = int(counts.sum())
        self.num_tokens = T
        slots = [self.slot_list[i] for i in sorted(present)]
        token1 = None  # (T,) slot id + 1 per token, built only if some layer needs per-token indices
        plan: dict[int, LayerPlan] = {}
        for layer in sorted({s.layer for s in slots}):
            here = [s for s in slots if s.layer == layer]
            if len(here) == 1 and steered_everywhere and len(present) == 1:
                plan[layer] = LayerPlan(uniform=here[0])
                continue
            if token1 is None:
                token1 = self._token_slots(slot_ids, counts, T)
            lp = plan[layer] = LayerPlan()
            dense = tuple(s.id for s in here if s.dense_add is not None)
            if dense:
                lp.dense_table, remap = self._dense_table(layer, dense)
                lp.dense_index = remap[token1]
            groups: dict[str, list[int]] = {}
            for s in here:
                if s.sparse is not None:
                    groups.setdefault(s.group, []).append(s.id)
            for group, ids in groups.items():
                if (self.sparse_layout or ("segments" if self.device.type == "cpu" else "stacked")) == "segments":
                    lp.segments.append(self._segments(ids, token1))
                else:  # one launch for all slots (the Triton kernel's slot axis)
                    stack, remap = self._stack(layer, group, tuple(ids))
                    lp.sparse.append((stack, remap[token1]))
        self.plan = plan

    def _segments(self, ids: list[int], token1: torch.Tensor):
        """Rows of the tokens steered by slots `ids`, sorted by slot (stable), and each slot's run.
        On CPU a run per slot through the single-vector path beats one stacked call, whose torch
        path gathers and scatters the rows of every slot separately (docs/benchmarks.md)."""
        local = torch.full((len(self.slot_list) + 1,), len(ids), dtype=torch.int64)
        local[torch.tensor(ids, dtype=torch.int64) + 1] = torch.arange(len(ids))
        key = local[token1]  # position of the token's slot among `ids`; len(ids) = not steered here
        counts = torch.bincount(key, minlength=len(ids) + 1)[: len(ids)].tolist()
        order = torch.argsort(key, stable=True)[: sum(counts)]
        runs, start = [], 0
        for sid, c in zip(ids, counts):
            runs.append((self.slot_list[sid].sparse, start, start + c))
            start += c
        return order, runs

    def _token_slots(self, slot_ids: list[int], counts: torch.Tensor, T: int) -> torch.Tensor:
        n_req = len(slot_ids)
        if self._req_buf.numel() < n_req:
            self._req_buf = torch.empty(max(n_req, 2 * self._req_buf.numel()), dtype=torch.int64)
        req = self._req_buf[:n_req]
        req.copy_(torch.as_tensor(slot_ids, dtype=torch.int64)).add_(1)
        if self._token_buf.numel() < T or self._token_buf.device != self.device:
            self._token_buf = torch.empty(max(T, 2 * self._token_buf.numel()), dtype=torch.int64, device=self.device)
        out = self._token_buf[:T]
        out.copy_(torch.repeat_interleave(req, counts, output_size=T), non_blocking=True)
        return out

    def clear_plan(self) -> None:
        self.plan = None
        self.num_tokens = 0

    # ---- the op's body -----------------------------------------------------------------------
    def apply(self, hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer `layer`'s output (hidden + residual, as the next layer's fused add would form
        it), steered per token by this step's plan."""
        if hidden.dtype == torch.float32:
            h = hidden + residual
        else:
            h = (hidden.to(torch.float32) + residual.to(torch.float32)).to(hidden.dtype)
        lp = None if self.plan is None else self.plan.get(layer)
        if lp is None:
            return h
        n = min(h.shape[0], self.num_tokens)  # tokens past the scheduled ones are padding: left alone
        x = h[:n]
        if lp.uniform is not None:
            slot = lp.uniform
            if slot.dense_add is not None:
                _add_float32(x, slot.dense_add)
            else:
                from yapo_fast.kernels.sparse_steer import sparse_steer

                sparse_steer(x, slot.sparse, inplace=True)
            return h
        if lp.dense_index is not None:
            _add_float32(x, lp.dense_table[lp.dense_index[:n]])
        if lp.sparse or lp.segments:
            from yapo_fast.kernels.sparse_steer import sparse_steer

            for stack, idx in lp.sparse:
                sparse_steer(x, stack, slot_index=idx[:n], inplace=True)
            for order, runs in lp.segments:
                if n < self.num_tokens:  # fewer rows than scheduled tokens (never seen): keep those in range
                    keep = order < n
                    order = order[keep]
                    runs = _clip_runs(runs, keep)
                xs = x[order]
                for prepared, a, b in runs:
                    if b > a:
                        sparse_steer(xs[a:b], prepared, inplace=True)
                x[order] = xs
        return h


def _clip_runs(runs, keep: torch.Tensor):
    out, start = [], 0
    for prepared, a, b in runs:
        c = int(keep[a:b].sum())
        out.append((prepared, start, start + c))
        start += c
    return out


def _add_float32(x: torch.Tensor, add: torch.Tensor) -> None:
    """x += add computed in float32 (as the transformers hooks do), in place."""
    if x.dtype == torch.float32:
        x.add_(add)
    else:
        x.copy_(x.to(torch.float32) + add)


STATE = SteerState()
