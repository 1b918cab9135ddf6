"""The Steering object (yapo_fast.steering.Steering): checked once, taken by every host, and the
dense op's dispatch point against its reference."""

import pytest
import torch
from helpers import random_latent, random_sae, tiny_llama

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
