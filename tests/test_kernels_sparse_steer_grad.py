"""Gradients of the fused sparse steer wrt h and the vector's values: gradcheck in float64, and
equality with autograd through THE reference (float32, every CPU backend's forward)."""

import pytest
import torch
from helpers import SAE_KINDS, random_latent, random_sae

from yapo_fast.kernels.sparse_steer import prepare_sparse_steer, sparse_steer
from yapo_fast.kernels.sparse_steer_reference import sparse_steer_reference


@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("multiplier", (-2.0, -0.5, 1.0))
def test_gradcheck_float64(kind, multiplier):
    sae = random_sae(kind, d_in=12, d_sae=20, seed=3).to(dtype=torch.float64)
    h = (2.0 * torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).requires_grad_()
    v = random_latent(20, 9, "mixed", seed=2).double().requires_grad_()
    support = torch.nonzero(v.detach()).flatten()

    def f(h, v):
        return sparse_steer(h, prepare_sparse_steer(sae, v, multiplier, support=support))

    assert torch.autograd.gradcheck(f, (h, v), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ("torch", "numba"))
@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("sign", ("neg", "mixed", "pos"))
@pytest.mark.parametrize("multiplier", (-2.0, -1.0, 0.0, 2.0))
def test_grads_match_autograd_through_reference(backend, kind, sign, multiplier):
    sae = random_sae(kind, d_in=48, d_sae=300, seed=5)
    h0 = 2.0 * torch.randn(13, 48, generator=torch.Generator().manual_seed(6))
    v0 = random_latent(300, 40, sign, seed=7)
    support = torch.nonzero(v0).flatten()
    weight = torch.randn(13, 48, generator=torch.Generator().manual_seed(8))  # a non-trivial loss

    h_ref, v_ref = h0.clone().requires_grad_(), v0.clone().requires_grad_()
    (sparse_steer_reference(h_ref, sae, v_ref, multiplier) * weight).sum().backward()

    h, v = h0.clone().requires_grad_(), v0.clone().requires_grad_()
    (sparse_steer(h, prepare_sparse_steer(sae, v, multiplier), backend=backend) * weight).sum().backward()

    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-4, atol=1e-4)
    # The op differentiates wrt the support only (the vector's trained coordinates).
    torch.testing.assert_close(v.grad[support], v_ref.grad[support], rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(v.grad[~torch.isin(torch.arange(300), support)]) == 0
    if multiplier != 0.0:
        assert float(v.grad.abs().max()) > 1e-3


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_grad_from_zero_vector_with_explicit_support(kind):
    """The trainer starts at v = 0: every support entry is 'dependent' and d/dv = m * 1[z > 0] * g.W_dec."""
    sae = random_sae(kind, d_in=48, d_sae=200, seed=9)
    h = 2.0 * torch.randn(11, 48, generator=torch.Generator().manual_seed(1))
    support = torch.arange(0, 200, 3)
    v = torch.zeros(200, requires_grad=True)
    sparse_steer(h, prepare_sparse_steer(sae, v, -1.0, support=support)).pow(2).sum().backward()
    v_ref = torch.zeros(200, requires_grad=True)
    sparse_steer_reference(h, sae, v_ref, -1.0).pow(2).sum().backward()
    torch.testing.assert_close(v.grad[support], v_ref.grad[support], rtol=1e-4, atol=1e-4)
    assert float(v.grad.abs().max()) > 1e-3
