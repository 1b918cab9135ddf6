"""The SAE type: kinds, sae-lens round trip, loading errors."""

import pytest
import torch
from helpers import SAE_KINDS, random_sae

from yapo_fast import SAE, YapoFastError, load_sae
from yapo_fast.integrations.sae_lens_loading import save_sae, to_sae_lens
from yapo_fast.sae.autoencoder import layer_from_hook_name


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_encode_decode_match_sae_lens(kind, tmp_path):
    sae = random_sae(kind, d_in=48, d_sae=100, layer=3)
    h = torch.randn(13, 48)
    lens = to_sae_lens(sae)
    torch.testing.assert_close(sae.encode(h), lens.encode(h).detach())
    z = sae.encode(h)
    torch.testing.assert_close(sae.decode(z), lens.decode(z).detach())
    assert (z > 0).any() and (z == 0).any()
    if kind == "topk":
        assert int((z > 0).sum(-1).max()) <= sae.k
    save_sae(sae, tmp_path / "s")
    from sae_lens import SAE as SaeLensSAE

    assert SaeLensSAE.load_from_disk(str(tmp_path / "s")).cfg.d_sae == 100
    back = load_sae(tmp_path / "s")
    assert back.kind == kind and back.layer == 3 and back.weights_hash() == sae.weights_hash()


def test_hook_names():
    assert layer_from_hook_name("blocks.12.hook_resid_post") == 12
    assert layer_from_hook_name("blocks.12.hook_resid_pre") == 11
    assert layer_from_hook_name("model.layers.7") == 7
    assert layer_from_hook_name("blocks.3.attn.hook_z") is None


def test_bad_sae_inputs(tmp_path):
    with pytest.raises(YapoFastError, match="not a directory in sae-lens format"):
        load_sae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(YapoFastError, match="needs cfg.json"):
        load_sae(tmp_path / "empty")
    save_sae(random_sae("relu"), tmp_path / "s")
    (tmp_path / "s" / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(YapoFastError, match="corrupt"):
        load_sae(tmp_path / "s")
    s = random_sae("relu")
    with pytest.raises(YapoFastError, match="shape"):
        SAE(kind="relu", W_enc=s.W_enc, b_enc=s.b_enc, W_dec=s.W_dec[:, :10], b_dec=s.b_dec)
    with pytest.raises(YapoFastError, match="threshold"):
        SAE(kind="jumprelu", W_enc=s.W_enc, b_enc=s.b_enc, W_dec=s.W_dec, b_dec=s.b_dec)
    with pytest.raises(YapoFastError, match="k in 1..d_sae"):
        SAE(kind="topk", W_enc=s.W_enc, b_enc=s.b_enc, W_dec=s.W_dec, b_dec=s.b_dec, k=0)
    bad = s.W_enc.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(YapoFastError, match="NaN"):
        SAE(kind="relu", W_enc=bad, b_enc=s.b_enc, W_dec=s.W_dec, b_dec=s.b_dec)
