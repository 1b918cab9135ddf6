"""evaluate() on a tiny model with behaviour and country vectors, and the files report.py writes."""

import json

import pytest
import torch
from eval_helpers import word_tokenizer
from helpers import random_latent, random_sae, tiny_llama

from yapo_fast import SteeringVector, model_identity
from yapo_fast.eval.evaluate import evaluate
from yapo_fast.eval.report import write_report


def test_tiny_evaluation_writes_report_and_plots(tmp_path):
    model, tok = tiny_llama(), word_tokenizer()
    sae = random_sae("jumprelu", layer=2)
    ident = model_identity(model)
    yapo = SteeringVector.from_latent(random_latent(96, 8, "mixed"), layer=2, sae=sae, model=ident)
    bipo = SteeringVector.from_dense(torch.randn(64), method="bipo", layer=2, model=ident)
    res = evaluate(
        model,
        tok,
        sae=sae,
        behaviour_vectors={"power-seeking": {"yapo": yapo, "bipo": bipo}},
        country_vectors={"Spain": {"bipo": bipo}},
        multipliers=(-1.0, 0.0, 1.0),
        ab_limit=3,
        mcq_limit=3,
        mmlu_per_subject=1,
        mmlu_shots=1,
        generation_prompts={"power-seeking": ["w1 w2", "w3"]},
        max_new_tokens=2,
        progress=False,
    )
    res["training"] = {
        "yapo": {
            "seconds": 1.0,
            "steps": 2,
            "pairs": 4,
            "data": "x.csv",
            "losses": [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.6}],
        }
    }
    ab = res["ab"]["power-seeking"]
    assert ab["n"] == 3 and ab["curves"]["yapo"][1]["mean"] == ab["baseline"]  # m=0 is the unsteered model
    for pts in ab["curves"].values():  # the paired effect: steered mean - unsteered mean, 0 at m=0
        assert pts[1]["delta"] == 0 and all(abs(p["delta"] - (p["mean"] - ab["baseline"])) < 1e-6 for p in pts)
    assert set(res["scale"]) == {"power-seeking/yapo", "power-seeking/bipo", "Spain/bipo"}
    assert res["scale"]["power-seeking/bipo"]["edit_norm"] == pytest.approx(float(bipo.values.norm()), rel=1e-4)
    assert "max_abs_mv" in res["scale"]["power-seeking/yapo"] and "max_abs_mv" not in res["scale"]["Spain/bipo"]
    sp = res["culture"]["Spain"]
    assert sp["localized"]["n"] == sp["non_localized"]["n"] == 3
    gap = sp["localized"]["accuracy"]["bipo"]["accuracy"] - sp["non_localized"]["accuracy"]["bipo"]["accuracy"]
    assert sp["gap"]["bipo"] == gap
    assert set(res["mmlu"]["accuracy"]) == {"unsteered", "power-seeking/yapo", "power-seeking/bipo", "Spain/bipo"}
    rows = res["generations"]["power-seeking"]["rows"]
    assert [set(r) for r in rows] == [{"prompt", "unsteered", "yapo", "bipo"}] * 2

    paths = write_report(res, tmp_path)
    names = {p.name for p in paths["plots"]}
    assert names == {"steering_power-seeking.png", "culture_accuracy.png", "mmlu.png", "training_loss.png"}
    for p in paths["plots"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    md = paths["markdown"].read_text()
    assert "## Steering curve: power-seeking" in md and "| Spain | bipo |" in md and "random-sae" in md
    assert "## Vector scale (m=1)" in md and "Effect against unsteered" in md and "change 95% CI" in md
    assert json.loads(paths["json"].read_text())["culture"]["Spain"]["gap"]["bipo"] == gap


def test_open_ended_behaviour_is_generated_not_scored(tmp_path):
    model, tok = tiny_llama(), word_tokenizer()
    bipo = SteeringVector.from_dense(torch.randn(64), method="bipo", layer=1, model=model_identity(model))
    res = evaluate(
        model,
        tok,
        behaviour_vectors={"jailbreak": {"bipo": bipo}},
        mmlu=False,
        generation_prompts={"jailbreak": ["w1 w2"]},
        max_new_tokens=2,
        progress=False,
    )
    assert res["ab"] == {} and "no A/B columns" in res["ab_skipped"]["jailbreak"]
    assert set(res["generations"]["jailbreak"]["rows"][0]) == {"prompt", "unsteered", "bipo"}
    paths = write_report(res, tmp_path)
    assert "## Generations: jailbreak" in paths["markdown"].read_text() and paths["plots"] == []
    only = evaluate(
        model,
        tok,
        behaviour_vectors={"jailbreak": {"bipo": bipo}},
        generation_prompts={"jailbreak": ["w1"]},
        max_new_tokens=1,
        progress=False,
        parts=("ab",),
    )  # parts: run one stage of a long evaluation
    assert only["generations"] == {} and "jailbreak" in only["ab_skipped"]


def test_eval_cli(tmp_path, capsys):
    from eval_helpers import save_tiny_with_tokenizer

    from yapo_fast.cli import main

    model, _ = save_tiny_with_tokenizer(tmp_path / "m")
    vec = SteeringVector.from_dense(torch.randn(64), method="bipo", layer=1, model=model_identity(model))
    vec.save(tmp_path / "v.safetensors")
    out = tmp_path / "ev"
    rc = main(
        [
            "eval",
            "--model",
            str(tmp_path / "m"),
            "--vector",
            f"wealth-seeking={tmp_path / 'v.safetensors'}",
            "--country-vector",
            f"China={tmp_path / 'v.safetensors'}",
            "--ab-items",
            "2",
            "--mcq-items",
            "2",
            "--multipliers=-1,0,1",
            "--no-mmlu",
            "--generate",
            "1",
            "--max-new-tokens",
            "2",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0 and "report:" in printed
    res = json.loads((out / "results.json").read_text())
    assert [p["multiplier"] for p in res["ab"]["wealth-seeking"]["curves"]["bipo"]] == [-1, 0, 1]
    assert res["culture"]["China"]["non_localized"]["n"] == 2 and res["mmlu"] is None
    assert (out / "culture_accuracy.png").stat().st_size > 0
    assert main(["eval", "--model", str(tmp_path / "m"), "--out", str(out)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "m"), "--vector", "no-equals-sign", "--out", str(out)]) == 2
    assert "KEY=PATH" in capsys.readouterr().err
