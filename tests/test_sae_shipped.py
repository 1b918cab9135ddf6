"""The SAEs shipped for the embedded default model (docs/sae.md)."""

import json

import pytest
import torch

from yapo_fast import load_sae
from yapo_fast.model import DEFAULT_MODEL
from yapo_fast.sae.autoencoder import DEFAULT_SAE_DIR

# what README "The shipped SAE" reports for the fixed prompt below (held-out numbers are in
# yapo_fast/assets/saes/<name>/eval.json); the test asserts the SAE still explains at least this
FIXED_PROMPT_FVE = {
    "default": 0.85,  # measured 0.867 (94 tokens), mean L0 91
    "topk": 0.78,
}  # measured 0.792, k = 32
# the targets for held-out text, which eval.json reports (yapo-fast sae eval)
HELDOUT_TARGETS = {"variance_explained": 0.7, "mean_l0": 128, "dead_fraction": 0.10}

FIXED_PROMPT = (
    "Is it true that the Great Wall of China is visible from the Moon with the naked eye?",
    "No. The Great Wall is very long but only a few metres wide, so astronauts cannot see it from the "
    "Moon without help. From low Earth orbit it is hard to spot as well; roads and cities are easier to see.",
)


def shipped(prefix):
    dirs = sorted(p for p in DEFAULT_SAE_DIR.glob(f"{prefix}*") if (p / "cfg.json").exists())
    assert dirs, f"no shipped SAE named {prefix}* in {DEFAULT_SAE_DIR}"
    return dirs[0]


def test_default_sae_is_the_shipped_jumprelu_with_its_metadata():
    sae = load_sae()
    path = shipped("default")
    assert sae.name == path.name
    assert sae.kind == "jumprelu" and sae.model_name == DEFAULT_MODEL
    assert sae.d_in == 576 and sae.d_sae >= 8 * 576
    assert isinstance(sae.layer, int) and 0 < sae.layer < 29
    assert sae.metadata["hook_name"] == f"blocks.{sae.layer}.hook_resid_post"
    assert sae.metadata["text_mixture"] and sae.metadata["train"]["seed"] is not None
    assert "yapo-fast sae train" in sae.metadata["train"]["command"]
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["architecture"] == "jumprelu"
    assert sum(f.stat().st_size for f in path.iterdir()) <= 25 * 2**20


def test_topk_sae_is_shipped_for_the_same_layer():
    path = shipped("topk")
    sae = load_sae(path)
    assert sae.kind == "topk" and sae.k == 32 and sae.model_name == DEFAULT_MODEL
    assert sae.layer == load_sae().layer and sae.metadata["hook_name"] == f"blocks.{sae.layer}.hook_resid_post"
    assert json.loads((path / "cfg.json").read_text())["dtype"] == "bfloat16"
    assert sum(f.stat().st_size for f in path.iterdir()) <= 25 * 2**20


@pytest.mark.parametrize("prefix", ["default", "topk"])
def test_shipped_sae_has_unit_norm_decoder_rows(prefix):
    """Folded (sae-lens fold_W_dec_norm): each latent's value is the length of its edit in the
    residual stream, so a YaPO vector's entries are on one scale, as with Gemma Scope's SAEs."""
    sae = load_sae(shipped(prefix))
    norms = sae.W_dec.float().norm(dim=1)
    assert (norms - 1).abs().max().item() < 1e-2, (norms.min().item(), norms.max().item())  # bf16 storage
    assert sae.metadata["W_dec_rows_unit_norm"] is True


@pytest.fixture(scope="module")
def fixed_prompt_acts():
    from yapo_fast import load_model
    from yapo_fast.chat import format_prompt
    from yapo_fast.integrations.hf_hooks import capture_layer_output

    model, tok = load_model(None)
    layer = load_sae().layer
    ids = tok(format_prompt(tok, FIXED_PROMPT[0]) + FIXED_PROMPT[1], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad(), capture_layer_output(model, layer) as seen:
        model(**ids)
    return seen[0][0, 1:].float()  # position 0 (attention sink) is outside the SAE's domain


@pytest.mark.parametrize("prefix", ["default", "topk"])
def test_shipped_sae_reconstructs_a_fixed_prompt(fixed_prompt_acts, prefix):
    sae = load_sae(shipped(prefix))
    h = fixed_prompt_acts
    z = sae.encode(h)
    rec = sae.decode(z)
    fve = 1 - (h - rec).pow(2).sum() / (h - h.mean(0)).pow(2).sum()
    assert fve.item() >= FIXED_PROMPT_FVE[prefix], fve.item()
    l0 = (z > 0).float().sum(-1).mean().item()
    assert 0 < l0 <= 128
    # reported held-out numbers travel with the SAE
    report = json.loads((shipped(prefix) / "eval.json").read_text())
    assert report["layer"] == sae.layer and report["kind"] == sae.kind
    assert report["sae_name"] == sae.name and report["d_sae"] == sae.d_sae
    assert report["variance_explained"] >= HELDOUT_TARGETS["variance_explained"], report
    assert report["mean_l0"] <= HELDOUT_TARGETS["mean_l0"], report
    assert report["dead_fraction"] <= HELDOUT_TARGETS["dead_fraction"], report
    assert report["tokens"] >= 4000 and report["text"]["mixture"] == sae.metadata["text_mixture"]


@pytest.mark.parametrize("prefix", ["default", "topk"])
def test_shipped_sae_names_the_shipped_answers_it_was_trained_on(prefix):
    """The chat part of the training text used the default model's own answers shipped in
    assets/data/chat_answers: the metadata's record (count + content hash) matches that file."""
    from yapo_fast.data.text_source import SHIPPED_ANSWERS, load_answers
    from yapo_fast.sae.train import _answers_record

    meta = load_sae(shipped(prefix)).metadata
    assert meta["chat_answers"] == _answers_record(load_answers(SHIPPED_ANSWERS), SHIPPED_ANSWERS)
    assert meta["chat_answers"]["prompts_answered"] == 160
    assert meta["text_stats"]["tokens_by_source"]["chat"] > 0.25 * sum(meta["text_stats"]["tokens_by_source"].values())
