"""Steering a transformers model through the forward hook."""

import pytest
import torch
from helpers import random_latent, random_sae, tiny_llama

from yapo_fast import SteeringVector, YapoFastError, decoder_layers, model_identity, patch_model, sparse_steer, steer
from yapo_fast.integrations.hf_hooks import capture_layer_output

LAYER = 2


def layer_outputs(model, ids):
    outs = {}
    hooks = [
        layer.register_forward_hook(
            lambda m, i, o, n=n: outs.__setitem__(n, (o if torch.is_tensor(o) else o[0]).clone())
        )
        for n, layer in enumerate(decoder_layers(model))
    ]
    logits = model(ids).logits
    for h in hooks:
        h.remove()
    return outs, logits


def yapo_vector(model, sae, sign="mixed"):
    return SteeringVector.from_latent(
        random_latent(sae.d_sae, 17, sign, seed=4), layer=LAYER, sae=sae, model=model_identity(model)
    )


@pytest.mark.parametrize("kind", ("relu", "jumprelu", "topk"))
@pytest.mark.parametrize("multiplier", (-1.0, 2.0))
def test_steering_applies_the_formula_at_layer_L_only(llama, kind, multiplier):
    sae = random_sae(kind, layer=LAYER)
    vec = yapo_vector(llama, sae)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    plain, plain_logits = layer_outputs(llama, ids)
    with steer(llama, vec, multiplier, sae=sae):
        steered, steered_logits = layer_outputs(llama, ids)
    for n in range(LAYER):  # earlier layers untouched, bit for bit
        assert torch.equal(plain[n], steered[n])
    torch.testing.assert_close(steered[LAYER], sparse_steer(plain[LAYER], sae, vec, multiplier))
    assert (steered_logits - plain_logits).abs().max() > 1e-4
    _, after = layer_outputs(llama, ids)
    assert torch.equal(after, plain_logits)  # exit restores the model exactly


def test_patch_handle_remove_restores_logits_bit_for_bit(llama):
    vec = SteeringVector.from_dense(torch.randn(64), method="bipo", layer=1, model=model_identity(llama))
    ids = torch.randint(0, 128, (1, 12))
    before = llama(ids).logits
    handle = patch_model(llama, vec, 3.0)
    assert handle.active
    with capture_layer_output(llama, 1) as seen:
        steered = llama(ids).logits
    assert not torch.equal(before, steered)
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(llama(ids).logits, before)
    with capture_layer_output(llama, 1) as seen_plain:
        llama(ids)
    torch.testing.assert_close(seen[0], seen_plain[0] + 3.0 * vec.values)


@pytest.mark.parametrize("arch", ("llama", "mistral", "gemma2"))
def test_generate_steers_prompt_and_new_tokens(arch):
    model = tiny_llama(arch=arch)
    vec = SteeringVector.from_dense(5 * torch.randn(64), method="caa", layer=1, model=model_identity(model))
    ids = torch.randint(0, 128, (1, 6))
    plain = model.generate(ids, max_new_tokens=8, do_sample=False)
    calls = []
    with steer(model, vec, 1.0):
        decoder_layers(model)[1].register_forward_hook(lambda m, i, o: calls.append(1))
        steered = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert calls and len(calls) == 8  # one forward per generated token, each steered
    assert not torch.equal(plain, steered)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), plain)


def test_bad_inputs_are_refused_with_the_fix(llama):
    sae = random_sae("jumprelu", layer=LAYER)
    other = random_sae("jumprelu", layer=LAYER, seed=9)
    vec = yapo_vector(llama, sae)
    with pytest.raises(YapoFastError, match="trained for SAE"):
        patch_model(llama, vec, sae=other)
    with pytest.raises(YapoFastError, match="d_sae"):
        patch_model(llama, vec, sae=random_sae("jumprelu", d_sae=100, layer=LAYER))
    with pytest.raises(YapoFastError, match="needs the SAE"):
        patch_model(llama, vec)
    far = SteeringVector.from_dense(torch.randn(64), method="bipo", layer=7)
    with pytest.raises(YapoFastError, match="out of range.*4 decoder layers"):
        patch_model(llama, far)
    wide = SteeringVector.from_dense(torch.randn(32), method="bipo", layer=1)
    with pytest.raises(YapoFastError, match="d_model=32"):
        patch_model(llama, wide)
    foreign = SteeringVector.from_dense(
        torch.randn(64), method="bipo", layer=1, model=model_identity(tiny_llama(seed=5))
    )
    with pytest.raises(YapoFastError, match="trained for model"):
        patch_model(llama, foreign)
    with pytest.raises(YapoFastError, match="finite"):
        patch_model(llama, SteeringVector.from_dense(torch.randn(64), method="bipo", layer=1), float("inf"))
