"""Which SAE entries of a YaPO vector matter: ranking by effect, and the share the top entries carry.

Effect of entry i (a latent index with a non-zero value v_i), at multiplier m:

    effect_i = |m * v_i| * ||W_dec[i]||_2

It is the largest norm entry i can add to the layer's output. Where m*v_i > 0 the entry adds the
constant m*v_i*W_dec[i] at every token (norm exactly effect_i); where m*v_i < 0 it caps feature i
at |m*v_i|, moving the output by at most effect_i (and by nothing where the feature is off). So
by the triangle inequality, ||h' - h|| <= sum_i effect_i at every token: the effects split an upper
bound of the delta's norm among the entries.

Share of the top k entries (the one definition used everywhere in the report):

    share(k) = sum of the k largest effect_i / sum of all effect_i        (1.0 when k >= nnz)

i.e. the fraction of the delta-norm bound that the k strongest entries carry, positive and negative
entries ranked together. ``entries_for_share(q)`` is the smallest k with share(k) >= q.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from yapo_fast.errors import YapoFastError


@dataclass(frozen=True)
class RankedEntry:
    latent: int  # SAE latent index
    value: float  # v_i as stored in the vector
    scaled: float  # m * v_i
    decoder_norm: float  # ||W_dec[i]||
    effect: float  # |m * v_i| * ||W_dec[i]||
    rank: int  # 1-based rank among all entries by effect

    @property
    def role(self) -> str:
        """'add' (m*v_i > 0: adds the feature's direction) or 'cap' (m*v_i < 0: caps the feature)."""
        return "add" if self.scaled > 0 else "cap"

    def to_dict(self) -> dict:
        return {**asdict(self), "role": self.role}


@dataclass
class Ranking:
    entries: list[RankedEntry]  # all non-zero entries, strongest first
    multiplier: float
    total_effect: float

    @property
    def positive(self) -> list[RankedEntry]:
        return [e for e in self.entries if e.scaled > 0]

    @property
    def negative(self) -> list[RankedEntry]:
        return [e for e in self.entries if e.scaled < 0]

    def share(self, k: int) -> float:
        """sum of the k largest effects / sum of all effects (see the module docstring)."""
        if k < 0:
            raise YapoFastError(f"top-k share needs k >= 0, got {k}")
        if self.total_effect == 0.0:
            return 0.0
        return min(1.0, sum(e.effect for e in self.entries[:k]) / self.total_effect)

    def entries_for_share(self, q: float) -> int:
        """Smallest k with share(k) >= q (0 for an all-zero vector)."""
        if not 0.0 < q <= 1.0:
            raise YapoFastError(f"share target must lie in (0, 1], got {q}")
        acc = 0.0
        for k, e in enumerate(self.entries, 1):
            acc += e.effect
            if acc >= q * self.total_effect * (1 - 1e-12):
                return k
        return len(self.entries)


def rank_entries(latent_indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor, multiplier: float) -> Ranking:
    """Rank a sparse latent vector's entries by effect (ties broken by the lower latent index)."""
    idx = latent_indices.detach().to("cpu", torch.int64).reshape(-1)
    val = values.detach().to("cpu", torch.float64).reshape(-1)
    if idx.numel() != val.numel():
        raise YapoFastError(f"{idx.numel()} latent indices but {val.numel()} values")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= W_dec.shape[0]):
        raise YapoFastError(
            f"latent indices must lie in [0, d_sae={W_dec.shape[0]}): the vector belongs to another SAE"
        )
    norms = W_dec.detach().to("cpu", torch.float64)[idx].norm(dim=1)
    scaled = float(multiplier) * val
    effect = scaled.abs() * norms
    keep = scaled != 0
    order = sorted((i for i in range(idx.numel()) if keep[i]), key=lambda i: (-float(effect[i]), int(idx[i])))
    entries = [
        RankedEntry(
            latent=int(idx[i]),
            value=float(val[i]),
            scaled=float(scaled[i]),
            decoder_norm=float(norms[i]),
            effect=float(effect[i]),
            rank=r,
        )
        for r, i in enumerate(order, 1)
    ]
    return Ranking(entries=entries, multiplier=float(multiplier), total_effect=float(sum(e.effect for e in entries)))


def rank_vector(vector, sae, multiplier: float | None = None) -> Ranking:
    """Ranking of a YaPO SteeringVector's entries against its SAE (multiplier: the vector's own by default)."""
    if not vector.is_sparse:
        raise YapoFastError(
            f"a {vector.method} vector is dense; rank its SAE projection (yapo_fast.explain.dense_projection) instead"
        )
    m = vector.multiplier if multiplier is None else multiplier
    return rank_entries(vector.indices, vector.values, sae.W_dec, m)
