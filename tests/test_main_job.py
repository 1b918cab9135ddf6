"""The main job end to end in a reduced setting (tiny random model, random SAE, few pairs/items)."""

import json

from eval_helpers import save_tiny_with_tokenizer
from helpers import random_sae
from yapo_fast.cli import main
from yapo_fast.integrations.sae_lens_loading import save_sae

TINY = ["--pairs", "4", "--epochs", "1", "--batch-size", "2", "--ab-items", "4", "--mmlu-per-subject", "1",
        "--mmlu-shots", "1", "--prompts", "2", "--max-new-tokens", "3", "--no-vllm"]


def test_main_job_end_to_end(tmp_path, capsys):
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
    assert res["mmlu"]["n"] == 10 and set(res["mmlu"]["change"]) == {f"hallucination/{m}" for m in ("yapo", "bipo", "caa")}
    assert len(res["training"]["yapo"]["losses"]) == 2 and res["training"]["caa"]["losses"] == []
    assert len(res["generations"]["hallucination"]["rows"]) == 2
    assert res["throughput"]["engine"] == "transformers" and res["throughput"]["yapo"]["tokens_per_s"] >= 0
    for name in ("steering_hallucination.png", "mmlu.png", "training_loss.png", "report.md"):
        assert (out / name).stat().st_size > 0


def test_main_job_bad_input_is_a_clean_error(tmp_path, capsys):
    save_tiny_with_tokenizer(tmp_path / "m")
    rc = main(["main", "--model", str(tmp_path / "m"), "--sae", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "not a directory in sae-lens format" in err and "Traceback" not in err
