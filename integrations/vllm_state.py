"""Worker-side state of the vLLM plugin (runs in each worker process): named vectors, their
prepared (vector, multiplier) slots written into per-layer steering tables, and the per-token row
map that the steering op (integrations/vllm_plugin.py) reads at every decoder layer it is
installed on.

The op body is the graph-safe table step (kernels/table_steer.py): one fixed sequence of tensor ops
per steered layer whose shapes depend only on the number of tokens. Registering, replacing or
removing a vector, or a new multiplier, writes into the tables; a step writes the per-token rows
into a persistent buffer before the forward (as vLLM writes its own inputs).

One instance per process (``STATE``). Nothing here imports vLLM: the plan is built from plain
lists (request order, tokens scheduled per request, each request's extra_args), so it is tested
without an engine.

What a request asks for: integrations/vllm_requests.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from yapo_fast.errors import YapoFastError
from yapo_fast.integrations.vllm_requests import UNSET, parse_request_args
from yapo_fast.kernels.table_steer import SteerTable, table_steer

MAX_SLOTS = 256  # distinct (vector, multiplier) pairs per worker: the rows of every layer's table
GRAPH_TABLE_WIDTH = 4096  # columns of a table allocated before CUDA graph capture (YAPO_FAST_TABLE_WIDTH)
TOKEN_CAPACITY = 8192  # first size of the per-token row buffer (grown when a step schedules more)


@dataclass
class NamedVector:
    vector: object  # yapo_fast.SteeringVector
    sae: object | None  # yapo_fast.SAE for yapo vectors
    multiplier: float  # default multiplier
    # the SAE in float32 on the worker's device and its table group, made once per registration (a
    # copy and a weights hash of the whole SAE per (vector, multiplier) slot cost ~40 ms each)
    prepared_sae: object | None = None
    group: str | None = None


@dataclass
class Slot:
    """One (vector, multiplier), written into row ``id + 1`` of its layer's table. ``id`` is the value
    the per-request map holds (-1: unsteered)."""

    key: tuple
    layer: int
    id: int


def table_width() -> int | None:
    """Columns of a layer's table (distinct dependent latents of its vectors): YAPO_FAST_TABLE_WIDTH,
    or None for the SAE's d_sae (never full)."""
    raw = os.environ.get("YAPO_FAST_TABLE_WIDTH", "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise YapoFastError(f"YAPO_FAST_TABLE_WIDTH={raw!r}: give a number of latents, e.g. 4096")
    return int(raw)


class SteerState:
    def __init__(self):
        self.vectors: dict[str, NamedVector] = {}
        self.global_spec: tuple | None = None  # (GLOBAL_NAME-or-name, m) from yapo_fast.patch
        self.slots: dict[tuple, Slot] = {}
        self.tables: dict[int, SteerTable] = {}  # layer -> its steering table
        self.installed_layers: set[int] = set()
        self.device = torch.device("cpu")
        # graph_safe: the engine replays CUDA graphs, so the op must always run its full table step
        # (a graph captured with the op skipped would replay it skipped); set by vllm_hooks
        self.graph_safe = False
        self.steered = False  # some token of this step is steered
        self.num_tokens = 0
        self._generation = 0  # bumped whenever what a request maps to changes
        self._requests: dict[str, int] = {}  # request id -> slot id (-1 unsteered), for this registry
        self._req_buf = torch.empty(0, dtype=torch.int64)  # per-request table row (0 = unsteered)
        self._token_buf = torch.zeros(0, dtype=torch.int64)  # per-token table row, on self.device

    # ---- registry ----------------------------------------------------------------------------
    def register(self, name: str, vector, sae=None, multiplier: float | None = None) -> None:
        if vector.is_sparse and sae is None:
            raise YapoFastError(f"vector {name!r} is a yapo vector: it needs its SAE")
        if vector.is_sparse:
            vector.check_compatible(sae=sae)
        m = vector.multiplier if multiplier is None else float(multiplier)
        self._forget(name)
        self.vectors[name] = NamedVector(vector, sae, float(m))

    def unregister(self, name: str) -> None:
        self.vectors.pop(name, None)
        self._forget(name)
        if self.global_spec and self.global_spec[0] == name:
            self.global_spec = None

    def _forget(self, name: str) -> None:
        for key in [k for k in self.slots if k[0] == name]:
            self._drop(self.slots.pop(key))
        self._changed()

    def _drop(self, slot: Slot) -> None:
        self.tables[slot.layer].clear(slot.id + 1)

    def _changed(self) -> None:
        """What requests map to changed: parse them again."""
        self._generation += 1
        self._requests.clear()

    def set_global(self, name: str | None, multiplier: float | None = None) -> None:
        if name is not None and name not in self.vectors:
            raise YapoFastError(f"no steering vector named {name!r} is registered in this worker")
        self.global_spec = None if name is None else (name, multiplier)
        self._requests.clear()  # requests without yapo arguments follow the engine-wide vector

    @property
    def active(self) -> bool:
        return bool(self.vectors)

    # ---- slots and tables ----------------------------------------------------------------------
    def slot(self, name: str, multiplier: float | None) -> Slot:
        nv = self.vectors.get(name)
        if nv is None:
            raise YapoFastError(f"unknown steering vector {name!r}; registered: {sorted(self.vectors)}")
        m = nv.multiplier if multiplier is None else float(multiplier)
        key = (name, m)
        slot = self.slots.get(key)
        if slot is None:
            if len(self.slots) >= MAX_SLOTS:  # many distinct multipliers: start the tables over
                for old in self.slots.values():
                    self._drop(old)
                self.slots.clear()
                self._changed()
            used = {s.id for s in self.slots.values()}
            slot = Slot(key=key, layer=nv.vector.layer, id=next(i for i in range(MAX_SLOTS) if i not in used))
            self._write(slot, nv, m)
            self.slots[key] = slot
        return slot

    def use_graphs(self, d_model: int) -> None:
        """The engine replays CUDA graphs: allocate every installed layer's table now, at its final
        width, before capture; from here on the op runs the full table step at every layer."""
        self.graph_safe = True
        for layer in self.installed_layers:
            self._table(layer, d_model, table_width() or GRAPH_TABLE_WIDTH)

    def _write(self, slot: Slot, nv: NamedVector, m: float) -> None:
        vec = nv.vector
        if not vec.is_sparse:
            self._table(slot.layer, vec.d_model, 0).write(slot.id + 1, const=m * vec.dense().to(self.device))
            return
        from yapo_fast.kernels.sparse_steer_prepare import prepare_sparse_steer

        if self.graph_safe and nv.sae.kind == "topk":  # its cut needs the SAE's weights in the captured graph
            raise YapoFastError(
                "TopK SAEs cannot steer an engine that replays CUDA graphs yet (ReLU and JumpReLU SAEs can): "
                "build the LLM with enforce_eager=True to steer with this one"
            )
        if nv.prepared_sae is None or nv.prepared_sae.device != self.device:
            nv.prepared_sae = sae = nv.sae.to(device=self.device, dtype=torch.float32)
            nv.group = f"{sae.kind}|{sae.d_in}|{sae.d_sae}|{sae.k}|{nv.sae.weights_hash()}"
        sae = nv.prepared_sae
        prepared = prepare_sparse_steer(sae, vec.latent().to(self.device), m)
        table = self._table(slot.layer, sae.d_in, table_width() or sae.d_sae)
        table.write(slot.id + 1, const=prepared.const, prepared=prepared, group=nv.group)

    def _table(self, layer: int, d_model: int, width: int) -> SteerTable:
        """The layer's table, made (or widened, once, when its first yapo vector arrives) to hold
        `width` columns; its rows are the slot ids + 1."""
        table = self.tables.get(layer)
        if self.graph_safe and table is not None:  # captured graphs read these very buffers
            return table
        if table is None or table.width < width:
            # normal tensors even when made inside a step (inference mode): RPCs write them later
            with torch.inference_mode(False):
                new = SteerTable(d_model, rows=MAX_SLOTS + 1, width=width, device=self.device)
            if table is not None:
                if table.used_width:
                    raise YapoFastError("a layer's steering table cannot widen while yapo vectors use it")
                new.const.copy_(table.const)
            table = self.tables[layer] = new
        return table

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
            # a new slot overflowed the slot table and started it over: map again (once)
        raise YapoFastError(f"one step asks for more than {MAX_SLOTS} distinct (vector, multiplier) pairs")

    def forget_requests(self, req_ids) -> None:
        for rid in req_ids:
            self._requests.pop(rid, None)

    def build_plan(self, specs: list, tokens_per_request) -> None:
        """specs[i]: the (name, m) steering request i of this step (None: unsteered), in the
        order in which its scheduled tokens are laid out; tokens_per_request[i]: how many."""
        self.build_plan_ids([-1 if s is None else self.slot(*s).id for s in specs], tokens_per_request)

    def build_plan_ids(self, slot_ids: list[int], tokens_per_request) -> None:
        """slot_ids[i]: slot of request i (-1 unsteered) in the batch order of its scheduled tokens;
        tokens_per_request[i]: how many it has this step. Writes each token's table row into the
        persistent buffer (one repeat_interleave; rows past the step's tokens hold 0)."""
        n_req = len(slot_ids)
        counts = torch.as_tensor(np.asarray(tokens_per_request)[:n_req], dtype=torch.int64)
        self.num_tokens = T = int(counts.sum())
        self.steered = any(s >= 0 for s in slot_ids)
        if self.steered or self.graph_safe:
            self._token_rows(slot_ids, counts, T)

    def _token_rows(self, slot_ids: list[int], counts: torch.Tensor, T: int) -> None:
        n_req = len(slot_ids)
        if self._req_buf.numel() < n_req:
            self._req_buf = torch.empty(max(n_req, 2 * self._req_buf.numel()), dtype=torch.int64)
        req = self._req_buf[:n_req]
        req.copy_(torch.as_tensor(slot_ids, dtype=torch.int64)).add_(1)
        if self._token_buf.numel() < T or self._token_buf.device != self.device:
            size = max(T, TOKEN_CAPACITY, 2 * self._token_buf.numel())
            self._token_buf = torch.zeros(size, dtype=torch.int64, device=self.device)
        self._token_buf[:T].copy_(torch.repeat_interleave(req, counts, output_size=T), non_blocking=True)
        if self.graph_safe:  # a replayed graph steers its padded tokens too: they must read row 0
            self._token_buf[T:].zero_()

    def clear_plan(self) -> None:
        self.steered = False
        self.num_tokens = 0

    # ---- the op's body -----------------------------------------------------------------------
    def apply(self, hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer `layer`'s output (hidden + residual, as the next layer's fused add would form
        it), steered per token by its row of the layer's table."""
        if hidden.dtype == torch.float32:
            h = hidden + residual
        else:
            h = (hidden.to(torch.float32) + residual.to(torch.float32)).to(hidden.dtype)
        table = self.tables.get(layer)
        if table is None or not (self.steered or self.graph_safe):
            return h
        if self.graph_safe:  # every row, every column: shapes fixed by the batch size alone
            return table_steer(h, self._token_buf[: h.shape[0]], table)
        n = min(h.shape[0], self.num_tokens)  # tokens past the scheduled ones are padding: left alone
        h[:n] = table_steer(h[:n], self._token_buf[:n], table, width=table.used_width)
        return h


STATE = SteerState()
