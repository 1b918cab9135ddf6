"""Scoring many steerings with one pass through the layers below L (eval_score.steered_next_token_logits,
evaluate.score_steerings) equals a hooked full forward per steering; and the vector-scale numbers."""

import pytest
import torch
from eval_helpers import word_tokenizer
from helpers import SAE_KINDS, random_latent, random_sae, tiny_llama

from yapo_fast import SteeringVector, model_identity, steer
from yapo_fast.eval.evaluate import score_steerings
from yapo_fast.eval.scale import layer_states, vector_scale
from yapo_fast.eval.score import next_token_logits, steered_next_token_logits
from yapo_fast.steering import make_steer_fn

TEXTS = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10 w11", "w12 w13", "w14 w15 w16 w17 w18"]
IDS = [5, 6, 7, 8]


def _hooked(model, tok, vec, m, sae):
    if vec is None or m == 0:
        return next_token_logits(model, tok, TEXTS, IDS, batch_size=2)
    with steer(model, vec, m, sae=sae if vec.is_sparse else None):
        return next_token_logits(model, tok, TEXTS, IDS, batch_size=2)


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_prefix_reuse_equals_hooked_forward(kind):
    model, tok = tiny_llama(), word_tokenizer()
    ident = model_identity(model)
    sae = random_sae(kind, layer=1)
    sparse = SteeringVector.from_latent(random_latent(96, 12, "mixed", scale=3.0), layer=1, sae=sae, model=ident)
    dense = SteeringVector.from_dense(
        4 * torch.randn(64, generator=torch.Generator().manual_seed(3)), method="bipo", layer=1, model=ident
    )
    steerings = {("none", 0): (None, 0.0)}
    steerings.update({(n, m): (v, m) for n, v in (("yapo", sparse), ("bipo", dense)) for m in (-2.0, -0.5, 1.0)})
    fns = {
        k: None if v is None else make_steer_fn(v, m, sae=sae if v.is_sparse else None)
        for k, (v, m) in steerings.items()
    }
    fast = steered_next_token_logits(model, tok, TEXTS, IDS, 1, fns, batch_size=3)
    for key, (vec, m) in steerings.items():
        ref = _hooked(model, tok, vec, m, sae)
        assert torch.allclose(fast[key], ref, atol=2e-5, rtol=1e-4), key
    moved = (fast[("yapo", 1.0)] - fast[("none", 0)]).abs().max()
    assert moved > 1e-3  # the steering is not a no-op, so the equality above means something


def test_score_steerings_groups_layers_and_falls_back_for_other_models():
    model, tok = tiny_llama(), word_tokenizer()
    ident = model_identity(model)
    v1 = SteeringVector.from_dense(3 * torch.randn(64), method="bipo", layer=0, model=ident)
    v3 = SteeringVector.from_dense(3 * torch.randn(64), method="caa", layer=3, model=ident)
    st = {"u": (None, 0.0), "a": (v1, 1.0), "b": (v3, -2.0), "z": (v1, 0.0)}
    got = score_steerings(model, tok, TEXTS, IDS, st, batch_size=2, progress=False)
    for key, (vec, m) in st.items():
        assert torch.allclose(got[key], _hooked(model, tok, vec, m, None), atol=2e-5, rtol=1e-4), key
    gemma = tiny_llama(arch="gemma2")  # soft-capped logits: not a lean-runner model, scored with hooks
    g = SteeringVector.from_dense(3 * torch.randn(64), method="bipo", layer=1, model=model_identity(gemma))
    got = score_steerings(gemma, tok, TEXTS, IDS, {"u": (None, 0.0), "g": (g, 1.0)}, progress=False)
    assert torch.allclose(got["g"], _hooked(gemma, tok, g, 1.0, None), atol=1e-6)
    assert not torch.allclose(got["g"], got["u"])


def test_vector_scale_by_hand():
    model, tok = tiny_llama(), word_tokenizer()
    ident = model_identity(model)
    h = layer_states(model, tok, TEXTS, 1)
    assert h.shape == (sum(len(t.split()) - 1 for t in TEXTS), 64)  # the first token of each text left out
    v = torch.zeros(64)
    v[0] = 2.0
    dense = SteeringVector.from_dense(v, method="bipo", layer=1, model=ident)
    sc = vector_scale(dense, h, multiplier=-1.5)
    assert sc["edit_norm"] == pytest.approx(3.0, rel=1e-5)  # ||m v|| at every token
    assert sc["edit_ratio"] == pytest.approx(float((3.0 / h.norm(dim=-1)).mean()), rel=1e-5)
    sae = random_sae("jumprelu", layer=1)
    h = torch.randn(50, 64, generator=torch.Generator().manual_seed(5))  # states the random SAE fires on
    z = sae.to(dtype=torch.float32).encode(h)
    dead = int((z > 0).sum(0).argmin())
    h, z = h[z[:, dead] == 0], z[z[:, dead] == 0]  # keep the rows where `dead` does not fire
    fires = (z > 0).sum(0)
    busy = int(fires.argmax())
    assert fires[busy] > 0 and fires[dead] == 0 and len(h) > 10
    lat = torch.zeros(96)
    lat[[busy, dead]] = torch.tensor([-0.5, 1.0])
    sparse = SteeringVector.from_latent(lat, layer=1, sae=sae, model=ident)
    sc = vector_scale(sparse, h, sae=sae, multiplier=2.0, top=2)
    assert sc["max_abs_mv"] == pytest.approx(2.0) and sc["top_abs_mv_median"] == pytest.approx(
        1.0
    )  # lower median of 2, 1
    assert sc["top_never_active"] == 1
    assert sc["z_active_median"] == pytest.approx(float(z[z[:, busy] > 0, busy].mean()), rel=1e-5)
    assert sc["edit_ratio"] > 0
