"""explain: the entry ranking and the top-k shares are exact on planted vectors; the dense projection
(cosines, matching pursuit) matches its definition."""

import pytest
import torch
from helpers import random_latent, random_sae

from yapo_fast import SteeringVector, YapoFastError
from yapo_fast.explain.dense_projection import project_dense
from yapo_fast.explain.ranking import rank_entries, rank_vector
from yapo_fast.kernels.sparse_steer_reference import sparse_steer_reference


def planted(sae, latents, values, norms):
    """Scale W_dec rows of `latents` to the given norms; a yapo vector with the given values."""
    for i, n in zip(latents, norms):
        sae.W_dec[i] = sae.W_dec[i] / sae.W_dec[i].norm() * n
    sae._hash = None
    latent = torch.zeros(sae.d_sae)
    latent[latents] = torch.tensor(values)
    return SteeringVector.from_latent(latent, layer=2, sae=sae, multiplier=1.5)


def test_ranking_is_exact_on_a_planted_vector():
    sae = random_sae("relu")
    vec = planted(sae, [3, 10, 50, 70], [2.0, -1.0, 0.5, -4.0], [1.0, 3.0, 2.0, 0.5])
    r = rank_vector(vec, sae)  # m = 1.5: effects 3, 4.5, 1.5, 3
    assert [e.latent for e in r.entries] == [10, 3, 70, 50]  # the tie 3 == 3 goes to the lower latent
    assert [e.effect for e in r.entries] == pytest.approx([4.5, 3.0, 3.0, 1.5], rel=1e-6)
    assert [e.rank for e in r.entries] == [1, 2, 3, 4]
    assert r.total_effect == pytest.approx(12.0, rel=1e-6)
    assert [e.latent for e in r.positive] == [3, 50] and [e.latent for e in r.negative] == [10, 70]
    assert {e.latent: e.role for e in r.entries} == {3: "add", 50: "add", 10: "cap", 70: "cap"}
    assert r.share(1) == pytest.approx(4.5 / 12, rel=1e-6)
    assert r.share(2) == pytest.approx(7.5 / 12, rel=1e-6)
    assert r.share(10) == 1.0 and r.share(0) == 0.0
    assert r.entries_for_share(0.5) == 2 and r.entries_for_share(0.625) == 2 and r.entries_for_share(0.9) == 4
    flipped = rank_vector(vec, sae, multiplier=-1.0)  # a negative multiplier swaps add and cap
    assert [e.latent for e in flipped.positive] == [10, 70] and [e.latent for e in flipped.negative] == [3, 50]


def test_top10_and_top50_shares_are_exact():
    sae = random_sae("jumprelu", d_sae=96)  # unit decoder rows
    latents = torch.randperm(96, generator=torch.Generator().manual_seed(1))[:60].sort().values
    effects = torch.arange(1, 61, dtype=torch.float64)  # entry j has effect j+1 at m = 2
    values = (effects / 2.0).float() * torch.where(torch.arange(60) % 3 == 0, -1.0, 1.0)
    r = rank_entries(latents, values, sae.W_dec, multiplier=2.0)
    total = 60 * 61 / 2
    assert r.total_effect == pytest.approx(total, rel=1e-6)
    assert r.share(10) == pytest.approx(sum(range(51, 61)) / total, rel=1e-6)
    assert r.share(50) == pytest.approx(sum(range(11, 61)) / total, rel=1e-6)
    assert r.share(60) == pytest.approx(1.0) and len(r.positive) + len(r.negative) == 60
    assert [round(e.effect) for e in r.entries] == list(range(60, 0, -1))


@pytest.mark.parametrize("kind", ["relu", "jumprelu", "topk"])
def test_total_effect_bounds_the_delta_norm(kind):
    """The reason for the definition: ||h' - h|| <= sum of effects at every token."""
    sae = random_sae(kind, d_in=48, d_sae=80, seed=3)
    latent = random_latent(80, 12, "mixed", seed=4, scale=1.5)
    vec = SteeringVector.from_latent(latent, layer=2, sae=sae)
    h = 2.0 * torch.randn(200, 48, generator=torch.Generator().manual_seed(5))
    for m in (1.0, -2.0, 0.5):
        delta = (sparse_steer_reference(h, sae, latent, m) - h).norm(dim=-1)
        assert float(delta.max()) <= rank_vector(vec, sae, m).total_effect * (1 + 1e-5)


def test_ranking_refuses_dense_vectors_and_foreign_indices():
    sae = random_sae("relu")
    dense = SteeringVector.from_dense(torch.ones(64), method="caa", layer=2)
    with pytest.raises(YapoFastError, match="dense"):
        rank_vector(dense, sae)
    with pytest.raises(YapoFastError, match="d_sae"):
        rank_entries(torch.tensor([500]), torch.tensor([1.0]), sae.W_dec, 1.0)


def test_dense_projection_planted_and_against_least_squares():
    sae = random_sae("relu", d_in=64, d_sae=96, seed=7)
    a, b = 11, 40
    sae.W_dec[a] = torch.zeros(64).index_fill_(0, torch.tensor([0]), 1.0)
    sae.W_dec[b] = torch.zeros(64).index_fill_(0, torch.tensor([1]), 1.0)
    v = 2.0 * sae.W_dec[a] + 1.0 * sae.W_dec[b]
    p = project_dense(v, sae.W_dec)
    assert p.omp_latents[:2] == [a, b]
    assert p.omp_explained[0] == pytest.approx(0.8, abs=1e-9) and p.omp_explained[1] == pytest.approx(1.0, abs=1e-9)
    assert p.features_for(0.5) == 1 and p.features_for(0.9) == 2
    assert p.top_aligned(2) == [(a, pytest.approx(2 / 5**0.5, rel=1e-5)), (b, pytest.approx(1 / 5**0.5, rel=1e-5))]
    # a generic vector: explained(t) is 1 - the least-squares residual on the first t picks
    g = torch.randn(64, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    p = project_dense(-3.0 * g, sae.W_dec, max_features=12)
    assert len(p.omp_explained) == 12 and all(x <= y + 1e-12 for x, y in zip(p.omp_explained, p.omp_explained[1:]))
    D = sae.W_dec.double()[p.omp_latents[:7]].T
    coef = torch.linalg.lstsq(D, -3.0 * g[:, None]).solution
    resid = float(((-3.0 * g[:, None] - D @ coef) ** 2).sum()) / float((3.0 * g).norm() ** 2)
    assert p.omp_explained[6] == pytest.approx(1 - resid, abs=1e-9)
    cos = torch.nn.functional.cosine_similarity(sae.W_dec.double(), -g[None], dim=1)
    torch.testing.assert_close(p.cosines.double(), cos, atol=1e-6, rtol=0)
    with pytest.raises(YapoFastError, match="zeros"):
        project_dense(torch.zeros(64), sae.W_dec)
