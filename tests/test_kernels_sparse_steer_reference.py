"""The reference YaPO op against an independent per-token loop over the formula."""

import pytest
import torch
from helpers import SAE_KINDS, random_latent, random_sae

from yapo_fast import YapoFastError, dense_steer, sparse_steer

MULTIPLIERS = (-2.0, -1.0, 0.0, 0.5, 1.0, 2.0)


def per_token_loop(h, sae, v, m):
    """The formula written out one token and one latent at a time, from the raw weights."""
    out = torch.empty_like(h, dtype=torch.float64)
    W_enc, b_enc, W_dec, b_dec = (t.double() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    for t in range(h.shape[0]):
        x = h[t].double()
        pre = [
            float((x - (b_dec if sae.apply_b_dec_to_input else 0)) @ W_enc[:, i] + b_enc[i]) for i in range(sae.d_sae)
        ]
        if sae.kind == "topk":
            kth = sorted(pre, reverse=True)[sae.k - 1]
            z = [max(p, 0.0) if p >= kth else 0.0 for p in pre]
        elif sae.kind == "jumprelu":
            z = [max(p, 0.0) if p > float(sae.threshold[i]) else 0.0 for i, p in enumerate(pre)]
        else:
            z = [max(p, 0.0) for p in pre]
        delta = torch.zeros(sae.d_in, dtype=torch.float64)
        for i in range(sae.d_sae):
            coef = max(z[i] + m * float(v[i]), 0.0) - z[i]
            if coef != 0.0:
                delta += coef * W_dec[i]
        out[t] = x + delta
    return out


@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("sign", ("pos", "neg", "mixed"))
@pytest.mark.parametrize("multiplier", MULTIPLIERS)
def test_reference_matches_per_token_loop(kind, sign, multiplier):
    sae = random_sae(kind, d_in=24, d_sae=40, seed=1)
    h = 2.0 * torch.randn(7, 24, generator=torch.Generator().manual_seed(2))
    v = random_latent(40, 9, sign, seed=3)
    got = sparse_steer(h, sae, v, multiplier)
    want = per_token_loop(h, sae, v, multiplier)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if multiplier != 0.0:  # a real effect: the test would fail on a no-op
        assert (got - h).abs().max() > 1e-3


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_multiplier_zero_leaves_h_unchanged(kind):
    sae = random_sae(kind)
    h = torch.randn(3, 5, 64)
    got = sparse_steer(h, sae, random_latent(96, 17, "mixed"), 0.0)
    torch.testing.assert_close(got, h, rtol=0, atol=1e-5)  # only Dec(z) - Dec(z) rounding


def test_positive_entries_add_a_constant():
    """z >= 0, so m*v_i >= 0 adds exactly m*v_i*W_dec[i] whatever h is (the structure fast paths use)."""
    sae = random_sae("jumprelu")
    v = random_latent(96, 10, "pos")
    h = torch.randn(11, 64)
    delta = sparse_steer(h, sae, v, 1.5) - h
    torch.testing.assert_close(delta, (1.5 * v @ sae.W_dec).expand_as(delta), rtol=1e-4, atol=1e-5)


def test_dense_steer_and_shape_errors():
    h = torch.randn(2, 3, 8)
    v = torch.randn(8)
    torch.testing.assert_close(dense_steer(h, v, -2.0), h - 2.0 * v)
    with pytest.raises(YapoFastError, match="d_model=9"):
        dense_steer(h, torch.randn(9), 1.0)
    with pytest.raises(YapoFastError, match="d_model=64"):
        sparse_steer(torch.randn(2, 8), random_sae("relu"), torch.zeros(96), 1.0)
    with pytest.raises(YapoFastError, match="finite"):
        sparse_steer(torch.randn(2, 64), random_sae("relu"), torch.zeros(96), float("nan"))
    bad = torch.zeros(96)
    bad[3] = float("inf")
    with pytest.raises(YapoFastError, match="NaN or inf"):
        sparse_steer(torch.randn(2, 64), random_sae("relu"), bad, 1.0)
