"""Saving and loading steering vectors; every bad file is refused with a clear message."""

import json

import pytest
import torch
from helpers import random_latent, random_sae
from safetensors.torch import save_file

from yapo_fast import SteeringVector, YapoFastError, load_vector


def yapo_vec(sae=None):
    sae = sae or random_sae("jumprelu")
    return SteeringVector.from_latent(
        random_latent(96, 17, "mixed"),
        layer=2,
        sae=sae,
        model={"name": "tiny", "d_model": 64, "n_layers": 4},
        info={"seed": 1},
    )


def test_roundtrip_sparse_and_dense(tmp_path):
    vec = yapo_vec()
    loaded = load_vector(vec.save(tmp_path / "v.safetensors"))
    assert loaded.method == "yapo" and loaded.layer == 2 and loaded.d_sae == 96 and loaded.sae == vec.sae
    assert torch.equal(loaded.latent(), vec.latent()) and loaded.indices.numel() == 17
    assert loaded.info == {"seed": 1} and loaded.model["name"] == "tiny"
    dense = SteeringVector.from_dense(torch.randn(64), method="bipo", layer=3, multiplier=-1.5)
    back = load_vector(dense.save(tmp_path / "d.safetensors"))
    assert torch.equal(back.dense(), dense.dense()) and back.multiplier == -1.5
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary behind


def test_load_checks_the_sae(tmp_path):
    sae = random_sae("jumprelu")
    path = yapo_vec(sae).save(tmp_path / "v.safetensors")
    load_vector(path, sae=sae)
    with pytest.raises(YapoFastError, match="trained for SAE"):
        load_vector(path, sae=random_sae("jumprelu", seed=3))


def test_truncated_and_corrupt_files(tmp_path):
    path = yapo_vec().save(tmp_path / "v.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(YapoFastError, match="corrupt or truncated"):
        load_vector(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(YapoFastError, match="corrupt or truncated"):
        load_vector(tmp_path / "junk.safetensors")
    with pytest.raises(YapoFastError, match="no steering vector file"):
        load_vector(tmp_path / "missing.safetensors")


def test_wrong_kind_and_inconsistent_files(tmp_path):
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(YapoFastError, match="not a yapo-fast steering vector"):
        load_vector(tmp_path / "other.safetensors")
    header = {"method": "yapo", "layer": 2, "d_model": 64, "d_sae": 96}
    save_file(
        {"values": torch.ones(3), "indices": torch.tensor([1, 2, 200])},
        str(tmp_path / "range.safetensors"),
        metadata={"yapo_fast": json.dumps(header)},
    )
    with pytest.raises(YapoFastError, match=r"indices must lie in \[0, d_sae=96\)"):
        load_vector(tmp_path / "range.safetensors")
    save_file(
        {"values": torch.ones(3), "indices": torch.tensor([1, 2])},
        str(tmp_path / "len.safetensors"),
        metadata={"yapo_fast": json.dumps(header)},
    )
    with pytest.raises(YapoFastError, match="2 indices but 3 values"):
        load_vector(tmp_path / "len.safetensors")
    save_file(
        {"values": torch.tensor([1.0, float("nan")])},
        str(tmp_path / "nan.safetensors"),
        metadata={"yapo_fast": json.dumps({"method": "bipo", "layer": 1, "d_model": 2})},
    )
    with pytest.raises(YapoFastError, match="NaN or inf"):
        load_vector(tmp_path / "nan.safetensors")
    save_file(
        {"values": torch.ones(4)},
        str(tmp_path / "dm.safetensors"),
        metadata={"yapo_fast": json.dumps({"method": "bipo", "layer": 1, "d_model": 5})},
    )
    with pytest.raises(YapoFastError, match="4 values but d_model=5"):
        load_vector(tmp_path / "dm.safetensors")
    save_file(
        {"values": torch.ones(4)},
        str(tmp_path / "m.safetensors"),
        metadata={"yapo_fast": json.dumps({"method": "magic", "layer": 1, "d_model": 4})},
    )
    with pytest.raises(YapoFastError, match="unknown steering method"):
        load_vector(tmp_path / "m.safetensors")


def test_nan_vector_is_refused_at_construction():
    with pytest.raises(YapoFastError, match="NaN or inf"):
        SteeringVector.from_dense(torch.tensor([1.0, float("inf")]), method="caa", layer=0)
