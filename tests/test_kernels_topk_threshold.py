"""TopK threshold (k-th and (k+1)-th largest pre-activation per token) against its reference,
kernels/topk_threshold_reference.py, and the tie rule `pre >= kth` end to end."""

import pytest
import torch
from helpers import random_latent, random_sae

from yapo_fast import SAE
from yapo_fast.kernels.sparse_steer import prepare_sparse_steer, sparse_steer
from yapo_fast.kernels.topk_threshold import topk_threshold
from yapo_fast.kernels.topk_threshold_reference import topk_cut, topk_threshold_reference

CPU_BACKENDS = ("torch", "numba")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "T,d_model,d_sae,k",
    [
        (1, 48, 96, 1),
        (7, 64, 1000, 32),
        (300, 64, 96, 95),
        (7, 48, 96, 96),
        (300, 576, 9216, 64),
        (5, 576, 9216, 1),
    ],
)
def test_matches_reference(backend, T, d_model, d_sae, k):
    sae = random_sae("topk", d_in=d_model, d_sae=d_sae, k=k, seed=d_sae)
    p = prepare_sparse_steer(sae, random_latent(d_sae, 1, "neg"), 1.0)
    x = 2.0 * torch.randn(T, d_model, generator=torch.Generator().manual_seed(T))
    kth, nxt = topk_threshold(x, p.topk_W_enc, p.topk_b_enc, k, backend=backend)
    want_kth, want_next = topk_threshold_reference(x, p.topk_W_enc, p.topk_b_enc, k)
    torch.testing.assert_close(kth, want_kth, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(nxt, want_next, rtol=1e-5, atol=1e-4)
    assert (kth >= nxt).all()
    # Against the SAE's own encode: exactly k latents of each token are >= the k-th value.
    pre = sae.pre_activation(x)
    if k < d_sae:
        assert ((pre >= topk_cut(kth, nxt)[:, None]).sum(1) == k).all()


def integer_topk_sae(d_model=16, d_sae=64, k=5, seed=0):
    """Integer weights and inputs: every pre-activation is an exact small integer in float32
    (whatever the summation order), so ties are plentiful and deterministic."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randint(-1, 2, (d_model, d_sae), generator=g).float()
    W_dec = torch.randn(d_sae, d_model, generator=g)
    return SAE(kind="topk", W_enc=W_enc, b_enc=torch.zeros(d_sae), W_dec=W_dec, b_dec=torch.zeros(d_model), k=k)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_include_every_latent_tied_with_the_kth(backend):
    sae = integer_topk_sae()
    x = torch.randint(-2, 3, (40, 16), generator=torch.Generator().manual_seed(1)).float()
    p = prepare_sparse_steer(sae, random_latent(64, 1, "neg"), 1.0)
    kth, nxt = topk_threshold(x, p.topk_W_enc, p.topk_b_enc, sae.k, backend=backend)
    want_kth, want_next = topk_threshold_reference(x, p.topk_W_enc, p.topk_b_enc, sae.k)
    assert torch.equal(kth, want_kth) and torch.equal(nxt, want_next)
    assert (kth == nxt).any(), "the fixture must actually contain ties at the k-th value"
    cut = topk_cut(kth, nxt)
    tied = kth == nxt
    assert torch.equal(cut[tied], kth[tied])


def steer_with_tie_rule(h, sae, v, m):
    """The YaPO formula with TopK's tie rule written out: z_i = ReLU(pre_i) where pre_i >= kth."""
    pre = sae.pre_activation(h)
    kth = torch.sort(pre, dim=1, descending=True).values[:, sae.k - 1 : sae.k]
    z = torch.where(pre >= kth, torch.relu(pre), torch.zeros(()))
    return h + (torch.relu(z + m * v) - z) @ sae.W_dec


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("multiplier", (-2.0, 1.0))
def test_steer_under_ties_follows_the_rule(backend, multiplier):
    sae = integer_topk_sae()
    x = torch.randint(-2, 3, (40, 16), generator=torch.Generator().manual_seed(1)).float()
    v = torch.where(torch.arange(64) % 2 == 0, -1.5, 0.75)  # every latent in the support
    got = sparse_steer(x, prepare_sparse_steer(sae, v, multiplier), backend=backend)
    want = steer_with_tie_rule(x, sae, v, multiplier)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float((got - x).abs().max()) > 1e-2
