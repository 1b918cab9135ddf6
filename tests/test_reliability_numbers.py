"""Reliability (issue 8), numbers: NaN and inf in activations, vectors or multipliers never flow on
silently, and a multiplier outside the documented range |m| <= MAX_ABS_MULTIPLIER is refused at
every door (steer, patch, sparse/dense steer, per-request vLLM arguments, the server's vector list,
the vector file, train and its CLI)."""

import math

import pytest
import torch
from helpers import random_latent, random_sae, tiny_llama
from trainer_fixtures import KW, single_thread, tiny_pairs, tiny_setup  # noqa: F401 (autouse fixture)

import yapo_fast
from yapo_fast import SteeringVector, YapoFastError
from yapo_fast.errors import MAX_ABS_MULTIPLIER, check_multiplier
from yapo_fast.integrations.vllm_requests import parse_request_args
from yapo_fast.integrations.vllm_vectors import parse_spec
from yapo_fast.steering import dense_steer, make_steer_fn, sparse_steer

OUT_OF_RANGE = [MAX_ABS_MULTIPLIER * 1.0001, -MAX_ABS_MULTIPLIER - 1, 1e9, -1e300]
NOT_FINITE = [math.nan, math.inf, -math.inf]
NOT_NUMBERS = [True, "1", None, [1.0]]


def test_the_range_is_closed_and_documented():
    assert MAX_ABS_MULTIPLIER == 100.0
    for m in (-MAX_ABS_MULTIPLIER, -2, 0, 0.5, MAX_ABS_MULTIPLIER):
        assert check_multiplier(m) == float(m)
    for m in OUT_OF_RANGE:
        with pytest.raises(YapoFastError, match="outside the supported range"):
            check_multiplier(m)
    for m in NOT_FINITE + NOT_NUMBERS:
        with pytest.raises(YapoFastError, match="finite number"):
            check_multiplier(m)
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "|m| <= 100" in readme  # the README's Reliability section states the range


@pytest.mark.parametrize("m", OUT_OF_RANGE + NOT_FINITE)
def test_every_host_refuses_a_bad_multiplier(m):
    sae = random_sae("jumprelu")
    yapo = SteeringVector.from_latent(random_latent(96, 8, "mixed"), layer=1, sae=sae)
    bipo = SteeringVector.from_dense(torch.randn(64), method="bipo", layer=1)
    model = tiny_llama()
    h = torch.randn(3, 64)
    calls = [
        lambda: sparse_steer(h, sae, yapo, m),
        lambda: dense_steer(h, bipo, m),
        lambda: make_steer_fn(yapo, m, sae=sae),
        lambda: yapo_fast.patch_model(model, bipo, m, check=False),
        lambda: yapo_fast.steer(model, yapo, m, sae=sae, check=False).__enter__(),
        lambda: SteeringVector.from_dense(torch.randn(64), method="bipo", layer=1, multiplier=m),
        lambda: parse_request_args({"yapo_vector": "v", "yapo_multiplier": m}),
        lambda: parse_request_args({"yapo_vector": "v", "yapo_multiplier": str(m)}),
        lambda: parse_request_args({"yapo": {"vector": "v", "multiplier": m}}),
        lambda: parse_spec(f"v=x.safetensors*{m}"),
        lambda: yapo_fast.train("bipo", tiny_pairs(2), multiplier=m),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(YapoFastError, match="finite number|outside the supported range"):
            call()
        assert not model.model.layers[1]._forward_hooks, f"call {i} left a hook behind"


def test_vllm_patch_refuses_before_touching_the_engine():
    from yapo_fast.integrations.vllm_patch import patch, steer_args

    bipo = SteeringVector.from_dense(torch.randn(64), method="bipo", layer=1)
    with pytest.raises(YapoFastError, match="outside the supported range"):
        patch(object(), bipo, 1e6)  # no engine needed: refused before any RPC
    with pytest.raises(YapoFastError, match="outside the supported range"):
        steer_args("bipo", -1e6)
    assert steer_args("bipo", -100) == {"yapo": {"vector": "bipo", "multiplier": -100.0}}


def test_request_arguments_that_would_be_silently_dropped_are_refused():
    with pytest.raises(YapoFastError, match="without a vector"):
        parse_request_args({"yapo_multiplier": 2.0})
    with pytest.raises(YapoFastError, match="without a vector"):
        parse_request_args({"yapo": {"vector": None, "multiplier": 2.0}})
    assert parse_request_args({"yapo_vector": "none"}) is None
    assert parse_request_args({"yapo_vector": "v", "yapo_multiplier": "100"}) == ("v", 100.0)


def test_cli_train_refuses_an_out_of_range_multiplier_before_training(tmp_path, capsys):
    from yapo_fast.cli import main

    rc = main(
        [
            "train",
            "--method",
            "bipo",
            "--layer",
            "1",
            "--multiplier",
            "1e9",
            "--pairs",
            "2",
            "--out",
            str(tmp_path / "v.safetensors"),
        ]
    )
    assert rc == 2 and "outside the supported range" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_nan_and_inf_in_vectors_are_refused():
    sae = random_sae("relu")
    h = torch.randn(4, 64)
    for bad in NOT_FINITE:
        latent = random_latent(96, 8, "mixed")
        latent[3] = bad
        with pytest.raises(YapoFastError, match="NaN or inf"):
            sparse_steer(h, sae, latent, 1.0)
        with pytest.raises(YapoFastError, match="NaN or inf"):
            SteeringVector.from_latent(latent, layer=1, sae=sae)
        dense = torch.randn(64)
        dense[5] = bad
        with pytest.raises(YapoFastError, match="NaN or inf"):
            dense_steer(h, dense, 1.0)  # a raw tensor, not a validated SteeringVector
        with pytest.raises(YapoFastError, match="NaN or inf"):
            SteeringVector.from_dense(dense, method="caa", layer=1)


def test_nan_activations_and_overflow_stop_the_forward_with_the_culprit():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 6))
    bipo = SteeringVector.from_dense(torch.randn(64), method="bipo", layer=1)
    with yapo_fast.steer(model, bipo, 1.0, check=False):
        assert torch.isfinite(model(ids).logits).all()  # the check passes on healthy states
    # the model itself produces NaN at layer 1 (a corrupt weight): named as the model's fault
    weight = model.model.layers[1].mlp.down_proj.weight
    saved = weight[0, 0].item()
    weight[0, 0] = float("nan")
    try:
        with yapo_fast.steer(model, bipo, 1.0, check=False):
            with pytest.raises(YapoFastError, match="already hold NaN or inf before steering"):
                model(ids)
    finally:
        weight[0, 0] = saved
    # finite states, a finite vector, an in-range multiplier, and still float32 overflow
    huge = SteeringVector.from_dense(torch.full((64,), 1e37), method="bipo", layer=1)
    with yapo_fast.steer(model, huge, 100.0, check=False):
        with pytest.raises(YapoFastError, match="produced NaN or inf from finite hidden states"):
            model(ids)
    sae = random_sae("topk", layer=1)
    latent = torch.zeros(96)
    latent[7] = 1e37
    yapo = SteeringVector.from_latent(latent, layer=1, sae=sae)
    with yapo_fast.steer(model, yapo, 50.0, sae=sae, check=False):
        with pytest.raises(YapoFastError, match="produced NaN or inf"):
            model(ids)
    assert not model.model.layers[1]._forward_hooks


def test_trainer_stops_at_a_nan_step_and_keeps_its_last_good_checkpoint(tmp_path, monkeypatch):
    from yapo_fast.train import trainer as trainer_mod
    from yapo_fast.train.checkpoint import load_checkpoint  # noqa: F401
    from yapo_fast.vector import load_vector

    model, tok, sae = tiny_setup("relu")
    pairs = tiny_pairs(4)
    real = trainer_mod.dpo_losses
    calls = {"n": 0}

    def nan_on_step_4(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == 4 else out

    monkeypatch.setattr(trainer_mod, "dpo_losses", nan_on_step_4)
    out = tmp_path / "v.safetensors"
    with pytest.raises(YapoFastError, match="step 4: the loss or the gradient of v is NaN"):
        yapo_fast.train("yapo", pairs, model=model, tokenizer=tok, sae=sae, out=out, checkpoint_every=1, **KW)
    monkeypatch.undo()
    # the checkpoint of step 3 holds a finite v, and the run resumes from it to the normal result
    resumed = yapo_fast.train("yapo", pairs, model=model, tokenizer=tok, sae=sae, out=out, checkpoint_every=1, **KW)
    assert resumed.resumed_from == 3
    straight = yapo_fast.train("yapo", pairs, model=model, tokenizer=tok, sae=sae, **KW)
    assert torch.equal(resumed.vector.latent(), straight.vector.latent())
    assert torch.isfinite(load_vector(out).values).all()
