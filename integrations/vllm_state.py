"""Worker-side state of the vLLM plugin: named vectors, prepared slots, and the per-step plan
that the steering op (integrations/vllm_op.py) reads at every decoder layer it is installed on.

One instance per process (``STATE``). Nothing here imports vLLM: the plan is built from plain
lists (request order, tokens scheduled per request, each request's extra_args), so it is tested
without an engine.

Request -> vector:
- ``extra_args={"yapo": {"vector": name, "multiplier": m}}`` (offline ``SamplingParams``), or the
  flat ``extra_args={"yapo_vector": name, "yapo_multiplier": m}`` (``vllm_xargs`` of the OpenAI
  server, whose values must be scalars). ``vector: None`` (or "none") = explicitly unsteered.
- no yapo arguments: the engine-wide vector set by ``yapo_fast.patch(llm, ...)``, if any.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import YapoFastError, check_multiplier

GLOBAL_NAME = "__patch__"  # the engine-wide vector of yapo_fast.patch(llm, vector)
UNSET = object()  # request carries no yapo arguments


def parse_request_args(extra_args) -> "object | None | tuple[str, float | None]":
    """UNSET (no yapo args), None (explicitly unsteered) or (name, multiplier or None)."""
    if not extra_args:
        return UNSET
    spec = extra_args.get("yapo", UNSET)
    if spec is UNSET:
        if "yapo_vector" not in extra_args and "yapo_multiplier" not in extra_args:
            return UNSET
        spec = {"vector": extra_args.get("yapo_vector"), "multiplier": extra_args.get("yapo_multiplier")}
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = {"vector": spec}
    if not isinstance(spec, dict):
        raise YapoFastError(f"extra_args['yapo'] must be a dict like {{'vector': 'name', 'multiplier': 1.0}}, "
                            f"got {type(spec).__name__}")
    unknown = set(spec) - {"vector", "multiplier"}
    if unknown:
        raise YapoFastError(f"unknown keys {sorted(unknown)} in the yapo request arguments; use 'vector' and "
                            "'multiplier'")
    name = spec.get("vector")
    if name is None or (isinstance(name, str) and name.lower() in ("", "none")):
        if spec.get("multiplier") is not None:  # a multiplier for no vector would be silently dropped
            raise YapoFastError("a yapo multiplier was given without a vector: name one (yapo_vector / "
                                "'vector') or drop the multiplier")
        return None
    if not isinstance(name, str):
        raise YapoFastError(f"the yapo vector must be named by a string, got {name!r}")
    m = spec.get("multiplier")
    if m is not None:
        if isinstance(m, str):
            try:
                m = float(m)
            except ValueError:
                raise YapoFastError(f"yapo multiplier must be a number, got {m!r}") from None
        m = check_multiplier(m, "yapo multiplier")
    return (name, m)


def cache_salt_for(spec) -> str | None:
    """What a request's steering adds to its prefix-cache salt (None: nothing), so KV computed
    under one vector/multiplier is never reused by a request steered differently or unsteered."""
    if spec is UNSET:
        return None
    if spec is None:
        return "yapo:none"
    name, m = spec
    return f"yapo:{name}:{'default' if m is None else repr(float(m))}"


@dataclass
class NamedVector:
    vector: object  # yapo_fast.SteeringVector
    sae: object | None  # yapo_fast.SAE for yapo vectors
    multiplier: float  # default multiplier


@dataclass
class Slot:
    """One (vector, multiplier), prepared once."""

    key: tuple
    layer: int
    sparse: object | None = None  # PreparedSteer (yapo)
    group: str | None = None  # sparse slots sharing this key stack together (same SAE kind/shape/k)
    dense_add: torch.Tensor | None = None  # (d_model,) float32 m*v (bipo / caa)


@dataclass
class LayerPlan:
    """What layer L does this step: per-token indices into a stacked sparse batch and a dense table."""

    sparse: list = field(default_factory=list)  # [(PreparedSlots, slot_index (T,) int32, -1 elsewhere)]
    dense_table: torch.Tensor | None = None  # (S_dense + 1, d_model), last row zeros
    dense_index: torch.Tensor | None = None  # (T,) int64 into dense_table


class SteerState:
    def __init__(self):
        self.vectors: dict[str, NamedVector] = {}
        self.global_spec: tuple | None = None  # (GLOBAL_NAME-or-name, m) from yapo_fast.patch
        self.slots: dict[tuple, Slot] = {}
        self.stacks: dict[tuple, object] = {}  # cache of PreparedSlots by slot keys
        self.installed_layers: set[int] = set()
        self.plan: dict[int, LayerPlan] | None = None
        self.num_tokens = 0
        self.device = torch.device("cpu")

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
        self.stacks.clear()

    def set_global(self, name: str | None, multiplier: float | None = None) -> None:
        if name is None:
            self.global_spec = None
            return
        if name not in self.vectors:
            raise YapoFastError(f"no steering vector named {name!r} is registered in this worker")
        self.global_spec = (name, multiplier)

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
            slot = self._prepare(key, nv, m)
            self.slots[key] = slot
        return slot

    def _prepare(self, key, nv: NamedVector, m: float) -> Slot:
        vec = nv.vector
        if vec.is_sparse:
            from ..kernels.sparse_steer_prepare import prepare_sparse_steer

            sae = nv.sae.to(device=self.device, dtype=torch.float32)
            prepared = prepare_sparse_steer(sae, vec.latent().to(self.device), m)
            group = f"{sae.kind}|{sae.d_in}|{sae.d_sae}|{sae.k}|{sae.weights_hash() if sae.kind == 'topk' else ''}"
            return Slot(key=key, layer=vec.layer, sparse=prepared, group=group)
        return Slot(key=key, layer=vec.layer, dense_add=(m * vec.dense().to(self.device, torch.float32)))

    def _stack(self, slots: list[Slot]):
        from ..kernels.sparse_steer_prepare import stack_prepared

        keys = tuple(s.key for s in slots)
        stack = self.stacks.get(keys)
        if stack is None:
            if len(self.stacks) > 256:  # many distinct batches: keep the cache bounded
                self.stacks.clear()
            stack = self.stacks[keys] = stack_prepared([s.sparse for s in slots])
        return stack

    # ---- per step ----------------------------------------------------------------------------
    def spec_for(self, extra_args):
        spec = parse_request_args(extra_args)
        return self.global_spec if spec is UNSET else spec

    def build_plan(self, specs: list, tokens_per_request) -> None:
        """specs[i]: the (name, m) steering request i of this step (None: unsteered), in the
        order in which its scheduled tokens are laid out; tokens_per_request[i]: how many."""
        self.plan = None
        self.num_tokens = 0
        if not self.active or all(s is None for s in specs):
            return
        counts = np.asarray(tokens_per_request, dtype=np.int64)
        self.num_tokens = int(counts.sum())
        ids: dict[tuple, int] = {}
        slots: list[Slot] = []
        per_req = np.full(len(specs), -1, dtype=np.int64)
        for i, spec in enumerate(specs):
            if spec is None:
                continue
            slot = self.slot(*spec)
            j = ids.get(slot.key)
            if j is None:
                j = ids[slot.key] = len(slots)
                slots.append(slot)
            per_req[i] = j
        token_slot = np.repeat(per_req, counts)  # (T,) index into `slots`, -1 unsteered
        plan: dict[int, LayerPlan] = {}
        for layer in sorted({s.layer for s in slots}):
            lp = LayerPlan()
            here = [j for j, s in enumerate(slots) if s.layer == layer]
            dense = [j for j in here if slots[j].dense_add is not None]
            if dense:
                table = torch.zeros(len(dense) + 1, slots[dense[0]].dense_add.numel(), device=self.device)
                remap = np.full(len(slots) + 1, len(dense), dtype=np.int64)  # -1 -> zero row
                for r, j in enumerate(dense):
                    table[r] = slots[j].dense_add
                    remap[j] = r
                lp.dense_table = table
                lp.dense_index = torch.from_numpy(remap[token_slot]).to(self.device)
            groups: dict[str, list[int]] = {}
            for j in here:
                if slots[j].sparse is not None:
                    groups.setdefault(slots[j].group, []).append(j)
            for members in groups.values():
                remap = np.full(len(slots) + 1, -1, dtype=np.int32)
                for r, j in enumerate(members):
                    remap[j] = r
                idx = torch.from_numpy(remap[token_slot]).to(self.device)
                lp.sparse.append((self._stack([slots[j] for j in members]), idx))
            plan[layer] = lp
        self.plan = plan

    def clear_plan(self) -> None:
        self.plan = None
        self.num_tokens = 0

    # ---- the op's body -----------------------------------------------------------------------
    def apply(self, hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer `layer`'s output (hidden + residual, as the next layer's fused add would form
        it), steered per token by this step's plan."""
        h = (hidden.to(torch.float32) + residual.to(torch.float32)).to(hidden.dtype)
        lp = None if self.plan is None else self.plan.get(layer)
        if lp is None:
            return h
        T = h.shape[0]
        n = min(T, self.num_tokens)  # tokens past the scheduled ones are padding: left alone
        if lp.dense_index is not None:
            add = lp.dense_table[lp.dense_index[:n]]
            h[:n] = (h[:n].to(torch.float32) + add).to(h.dtype)
        if lp.sparse:
            from ..kernels.sparse_steer import sparse_steer

            for stack, idx in lp.sparse:
                h[:n] = sparse_steer(h[:n], stack, slot_index=idx[:n])
        return h


STATE = SteerState()
