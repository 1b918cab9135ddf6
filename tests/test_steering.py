"""The Steering object (yapo_fast.steering.Steering): checked once, taken by every host, and the
dense op's dispatch point against its reference."""

import pytest
import torch
from helpers import SAE_KINDS, random_latent, random_sae, tiny_llama

from yapo_fast import Steering, SteeringVector, YapoFastError, model_identity, patch_model, steer
from yapo_fast.kernels.dense_steer import dense_steer
from yapo_fast.kernels.sparse_steer_reference import dense_steer_reference, sparse_steer_reference

LAYER = 2


@pytest.fixture
def setup():
    model = tiny_llama()
    sae = random_sae("jumprelu", layer=LAYER)
    latent = random_latent(sae.d_sae, 13, "mixed", seed=3)
    yapo = SteeringVector.from_latent(latent, layer=LAYER, sae=sae, model=model_identity(model), multiplier=1.5)
    bipo = SteeringVector.from_dense(torch.randn(64), method="bipo", layer=LAYER, model=model_identity(model))
    return model, sae, latent, yapo, bipo


def test_of_takes_the_vectors_multiplier_and_checks_it_once(setup):
    _, sae, _, yapo, bipo = setup
    s = Steering.of(yapo, sae=sae)
    assert (s.multiplier, s.sae, s.layer) == (1.5, sae, LAYER)
    assert Steering.of(s) is s and Steering.of(s, -2.0).multiplier == -2.0
    assert Steering.of(bipo, 2.0, sae=sae).sae is None  # dense steering reads no SAE
    with pytest.raises(YapoFastError, match="needs the SAE"):
        Steering.of(yapo)
    with pytest.raises(YapoFastError, match="d_sae"):
        Steering.of(yapo, sae=random_sae("jumprelu", d_sae=100, layer=LAYER))
    with pytest.raises(YapoFastError, match="multiplier"):
        Steering.of(bipo, float("nan"))
    with pytest.raises(YapoFastError, match="expected a SteeringVector"):
        Steering.of(torch.zeros(3))


@pytest.mark.parametrize("m", [-1.0, 0.5, 3.0])
def test_steer_fn_equals_the_references(setup, m):
    _, sae, latent, yapo, bipo = setup
    h = 3 * torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(Steering.of(yapo, m, sae=sae).steer_fn()(h), sparse_steer_reference(h, sae, latent, m))
    torch.testing.assert_close(Steering.of(bipo, m).steer_fn()(h), dense_steer_reference(h, bipo.dense(), m))


def test_hosts_take_a_steering_as_they_take_a_vector(setup):
    model, sae, _, yapo, _ = setup
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with steer(model, yapo, -1.0, sae=sae):
        by_vector = model(ids).logits
    with steer(model, Steering.of(yapo, -1.0, sae=sae)) as handle:
        by_steering = model(ids).logits
        assert handle.active and handle.multiplier == -1.0 and handle.vector is yapo and handle.layer == LAYER
    assert not handle.active
    assert torch.equal(by_vector, by_steering)
    handle = patch_model(model, Steering.of(yapo, sae=sae))
    handle.remove()
    handle.remove()  # idempotent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 64), (0, 64)])
@pytest.mark.parametrize("m", [-2.0, 0.0, 0.7])
def test_dense_dispatch_equals_its_reference(dtype, shape, m):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(*shape, generator=g).to(dtype)
    v = torch.randn(64, generator=g)
    got, want = dense_steer(h, v, m), dense_steer_reference(h, v, m)
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("m", (1.0, -1.0))
def test_trainable_steering_from_cached_codes_equals_the_op(kind, m):
    """The trainer's steered forward (Steering.trainable + steer_cached, from SAE codes cached once)
    equals the op, values and gradients wrt v; bipo is h + m v."""
    from yapo_fast.train.cache import sparse_codes

    sae = random_sae(kind, d_in=24, d_sae=40, seed=3)
    h = 2 * torch.randn(7, 24, generator=torch.Generator().manual_seed(1))
    codes = {k: t.long() if k != "vals" else t for k, t in sparse_codes(sae, h).items()}
    v = random_latent(40, 12, "mixed", seed=2).requires_grad_(True)
    got = Steering.trainable(v, m, sae=sae).steer_cached(h, codes)
    want = sparse_steer_reference(h, sae, v, m)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (g_got,) = torch.autograd.grad((got * h).sum(), v)
    (g_want,) = torch.autograd.grad((want * h).sum(), v)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)
    dense = torch.randn(24, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(Steering.trainable(dense, m).steer_cached(h), h + m * dense)
