"""The main job end to end in a reduced setting (tiny random model, random SAE, few pairs/items)."""

import json

from eval_helpers import save_tiny_with_tokenizer
from helpers import random_sae

from yapo_fast.cli import main
from yapo_fast.integrations.sae_lens_loading import save_sae

TINY = [
    "--pairs",
    "4",
    "--epochs",
    "1",
    "--batch-size",
    "2",
    "--ab-items",
    "4",
    "--mmlu-per-subject",
    "1",
    "--mmlu-shots",
    "1",
    "--prompts",
    "2",
    "--max-new-tokens",
    "3",
    "--heldout",
    "3",
    "--gen-prompts",
    "3",
    "--support",
    "8",
]


def fake_vllm(monkeypatch, fail=False):
    """Stand-in for the vLLM engine (minutes to start on a CPU; tested in the vLLM tests): it
    generates through transformers, so the main job's cross-check must find the same text."""
    import yapo_fast.eval.vllm as ev

    def make(model_path, tokenizer, sae=None, **kw):
        if fail:
            raise RuntimeError("no engine today")
        from transformers import AutoModelForCausalLM

        from yapo_fast.eval.evaluate import generate

        model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        return lambda prompts, vec, m, n: generate(model, tokenizer, prompts, vec, m, sae=sae, max_new_tokens=n)

    monkeypatch.setattr(ev, "vllm_available", lambda: True)
    monkeypatch.setattr(ev, "make_vllm_generate_fn", make)


def test_main_job_end_to_end(tmp_path, capsys, monkeypatch):
    fake_vllm(monkeypatch)
    save_tiny_with_tokenizer(tmp_path / "m")
    save_sae(random_sae("jumprelu", layer=2), tmp_path / "sae")
    out = tmp_path / "run"
    rc = main(["main", "--model", str(tmp_path / "m"), "--sae", str(tmp_path / "sae"), "--out", str(out), *TINY])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for method in ("yapo", "bipo", "caa"):
        assert f"\n{method} " in printed
        assert (out / "vectors" / f"{method}-hallucination-L2.safetensors").stat().st_size > 0
    assert "report:" in printed and "plot:" in printed
    res = json.loads((out / "results.json").read_text())
    curves = res["ab"]["hallucination"]["curves"]
    assert set(curves) == {"yapo", "bipo", "caa"}
    assert [p["multiplier"] for p in curves["yapo"]] == [-2, -1, -0.5, 0, 0.5, 1, 2]
    assert all(0 <= p["mean"] <= 1 for c in curves.values() for p in c)
    assert res["mmlu"]["n"] == 10 and set(res["mmlu"]["change"]) == {
        f"hallucination/{m}" for m in ("yapo", "bipo", "caa")
    }
    assert len(res["training"]["yapo"]["losses"]) == 2 and res["training"]["caa"]["losses"] == []
    # YaPO under the support budget, at its own learning rate; BiPO at --lr
    from yapo_fast import load_vector

    yapo = load_vector(out / "vectors" / "yapo-hallucination-L2.safetensors")
    assert yapo.is_sparse and yapo.values.numel() <= 8 and yapo.info["support"] == 8
    assert res["training"]["yapo"]["lr"] == 0.2 and res["training"]["bipo"]["lr"] != 0.2
    margin = res["margin"]["hallucination"]
    assert margin["n"] == 3 and set(margin["effects"]) == {"yapo", "bipo", "caa"}
    assert all([e["multiplier"] for e in effs] == [-1, 1] for effs in margin["effects"].values())
    scored = res["scored_generations"]["hallucination"]
    assert len(scored["rows"]) == 3 and set(scored["rows"][0]["scores"]) == {
        "unsteered",
        *(f"{m} m={s}1" for m in ("yapo", "bipo", "caa") for s in "-+"),
    }
    tp = res["throughput"]
    assert (
        tp["engine"] == "vllm"
        and tp["yapo m=+1"]["tokens_per_s"] > 0
        and tp["transformers"]["yapo m=-1"]["tokens_per_s"] > 0
    )
    assert set(tp["same_text_as_transformers"].values()) == {1.0} and len(tp["same_text_as_transformers"]) == 7
    assert "margin m=-1" in printed and "gen m=+1" in printed and "vLLM text equal to transformers on 100%" in printed
    for name in (
        "margin_hallucination.png",
        "steering_hallucination.png",
        "mmlu.png",
        "training_loss.png",
        "report.md",
    ):
        assert (out / name).stat().st_size > 0


def test_main_job_falls_back_when_vllm_or_the_sae_is_missing(tmp_path, capsys, monkeypatch):
    """Also: with no SAE shipped, YaPO is skipped (said so) and the dense methods steer --layer."""
    import yapo_fast.sae.autoencoder

    monkeypatch.setattr(yapo_fast.sae.autoencoder, "DEFAULT_SAE_DIR", tmp_path / "no-saes-here")
    fake_vllm(monkeypatch, fail=True)
    save_tiny_with_tokenizer(tmp_path / "m")
    out = tmp_path / "run"
    rc = main(
        ["main", "--model", str(tmp_path / "m"), "--layer", "1", "--out", str(out), "--methods", "yapo,caa", *TINY]
    )
    printed = capsys.readouterr().out
    assert rc == 0 and "vLLM engine did not start (RuntimeError: no engine today)" in printed
    assert "YaPO is skipped, BiPO and CAA steer layer 1" in printed
    assert (out / "vectors" / "caa-hallucination-L1.safetensors").exists()
    res = json.loads((out / "results.json").read_text())
    assert res["throughput"]["engine"] == "transformers" and "no engine today" in res["throughput"]["vllm_error"]
    assert list(res["ab"]["hallucination"]["curves"]) == ["caa"]


def test_main_job_bad_input_is_a_clean_error(tmp_path, capsys):
    save_tiny_with_tokenizer(tmp_path / "m")
    rc = main(
        [
            "main",
            "--model",
            str(tmp_path / "m"),
            "--sae",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "r"),
            *TINY,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "not a directory in sae-lens format" in err and "Traceback" not in err
