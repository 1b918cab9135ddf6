"""A dense (BiPO or CAA) vector seen through an SAE: which decoder directions it aligns with, and
how many SAE features it takes to explain it.

- Alignment: cos_i = <v, W_dec[i]> / (||v|| ||W_dec[i]||) for every latent i; the top features are
  those of largest |cos_i| (the sign says whether v points along or against the feature).

- Features needed for q of the norm (q = 50%, 90%): orthogonal matching pursuit (OMP) over the
  unit-normalised decoder rows. Step t picks the row most correlated (largest |<r, d_i>|) with the
  residual r, then r becomes v minus its least-squares projection onto the span of all rows picked
  so far. explained(t) = 1 - ||r_t||^2 / ||v||^2 is the fraction of v's squared norm carried by
  the first t picked features; k(q) is the smallest t with explained(t) >= q. The search stops
  after `max_features` picks; k(q) is None where q was not reached by then.

For a YaPO vector the comparable numbers are ranking.Ranking.entries_for_share(q): entries needed
for q of the effect mass (its own definition, in ranking.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from yapo_fast.errors import YapoFastError


@dataclass
class DenseProjection:
    cosines: torch.Tensor  # (d_sae,) cos(v, W_dec[i])
    omp_latents: list[int]  # latents in OMP pick order
    omp_explained: list[float]  # explained(t) after each pick, t = 1..len
    vector_norm: float

    def top_aligned(self, n: int) -> list[tuple[int, float]]:
        """(latent, cos) of the n features with largest |cos|, strongest first (ties: lower latent)."""
        n = min(n, self.cosines.numel())
        vals, idx = self.cosines.abs().topk(n)
        return [(int(i), float(self.cosines[i])) for i in idx.tolist()]

    def features_for(self, q: float) -> int | None:
        if not 0.0 < q <= 1.0:
            raise YapoFastError(f"explained-norm target must lie in (0, 1], got {q}")
        for t, e in enumerate(self.omp_explained, 1):
            if e >= q - 1e-9:
                return t
        return None


@torch.no_grad()
def project_dense(vector: torch.Tensor, W_dec: torch.Tensor, *, max_features: int = 256) -> DenseProjection:
    """Cosines of `vector` with every decoder row and the OMP explained-norm curve (see module doc)."""
    v = vector.detach().to("cpu", torch.float64).reshape(-1)
    D = W_dec.detach().to("cpu", torch.float64)
    if D.shape[1] != v.numel():
        raise YapoFastError(
            f"the vector has {v.numel()} dims but the SAE decodes to d_in={D.shape[1]}: "
            "use the SAE of the vector's model"
        )
    vnorm = float(v.norm())
    if vnorm == 0.0:
        raise YapoFastError("the vector is all zeros: nothing to explain")
    row_norms = D.norm(dim=1).clamp_min(1e-12)
    atoms = D / row_norms[:, None]
    cosines = (atoms @ v) / vnorm
    picked: list[int] = []
    explained: list[float] = []
    basis = torch.zeros(0, v.numel(), dtype=torch.float64)  # orthonormal basis of the picked rows' span
    r = v.clone()
    for _ in range(min(max_features, D.shape[0])):
        scores = (atoms @ r).abs()
        if picked:
            scores[picked] = -1.0
        i = int(scores.argmax())
        # Gram-Schmidt (twice, for stability) of the new atom against the basis: the residual is
        # then v minus its exact least-squares projection onto the picked span.
        q = atoms[i].clone()
        for _ in range(2):
            q -= basis.T @ (basis @ q)
        picked.append(i)
        if float(q.norm()) > 1e-10:
            basis = torch.cat([basis, (q / q.norm())[None]], dim=0)
            r = v - basis.T @ (basis @ v)
        explained.append(max(0.0, 1.0 - float(r @ r) / vnorm**2))
        if explained[-1] >= 1.0 - 1e-12:
            break
    return DenseProjection(cosines=cosines.float(), omp_latents=picked, omp_explained=explained, vector_norm=vnorm)
