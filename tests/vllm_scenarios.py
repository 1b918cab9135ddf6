"""Runs ONE vLLM engine (default model, float32, compiled mode) through the scenarios that
tests/test_vllm_plugin.py checks, and writes every generated token id to a JSON file.

A separate process because vLLM spawns workers (its entry point must sit under
``if __name__ == "__main__"``) and an engine start is slow: one start serves every test.

    python tests/vllm_scenarios.py job.json out.json
    python tests/vllm_scenarios.py tp job.json out.json     # tensor-parallel scenario (tiny model)
"""

import json
import sys
import time
import traceback

from yapo_fast.eval.vllm import kv_cache_bytes


def main(job_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    import yapo_fast
    from yapo_fast.integrations import vllm_patch

    job = json.loads(open(job_path).read())
    t0 = time.time()
    llm = LLM(
        model=job["model"],
        dtype="float32",
        max_model_len=256,
        max_num_seqs=16,
        max_num_batched_tokens=64,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        kv_cache_memory_bytes=kv_cache_bytes(0.5),
        seed=0,
    )
    out: dict = {"startup_s": time.time() - t0}
    n = job["max_tokens"]
    prompts = [{"prompt_token_ids": ids} for ids in job["prompt_ids"]]

    def gen(ps, extra=None):
        sps = [
            SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, extra_args=None if extra is None else extra[i])
            for i in range(len(ps))
        ]
        return [list(o.outputs[0].token_ids) for o in llm.generate(ps, sps, use_tqdm=False)]

    sae = yapo_fast.load_sae(job["sae"])
    yapo = yapo_fast.load_vector(job["yapo"])
    bipo = yapo_fast.load_vector(job["bipo"])

    out["base"] = gen(prompts)
    h = yapo_fast.patch(llm, yapo, job["yapo_m"], sae=sae)
    out["yapo"] = gen(prompts)
    h.remove()
    out["after_yapo"] = gen(prompts)
    yapo_fast.patch(llm, bipo, job["bipo_m"])
    out["bipo"] = gen(prompts)
    yapo_fast.unpatch(llm)
    out["after_bipo"] = gen(prompts)

    # Per-request vectors: a mixed batch against each request alone. The long prompt is split
    # over several steps (max_num_batched_tokens=64): chunked prefill beside decoding requests.
    yapo_fast.register_vector(llm, "yapo", yapo, sae=sae)
    yapo_fast.register_vector(llm, "bipo", bipo, job["bipo_m"])
    mixed = job["mixed"]  # [[prompt index, vector name or None, multiplier or None], ...]
    mixed_prompts = [{"prompt_token_ids": job["mixed_prompt_ids"][p]} for p, _, _ in mixed]
    mixed_args = [None if name is None else yapo_fast.steer_args(name, m) for _, name, m in mixed]
    out["mixed_batch"] = gen(mixed_prompts, mixed_args)
    out["mixed_alone"] = [gen([p], [a])[0] for p, a in zip(mixed_prompts, mixed_args)]

    # Engine-wide vector plus per-request choices: explicit None stays unsteered.
    yapo_fast.patch(llm, bipo, job["bipo_m"])
    out["global_plus_none"] = gen(prompts[:1], [yapo_fast.steer_args(None)])
    out["global_plus_default"] = gen(prompts[:1])
    yapo_fast.unpatch(llm)

    # yapo-fast generate's writer on this engine: bipo engine-wide, a resumed run (one line done)
    from pathlib import Path

    from yapo_fast.chat import format_prompt
    from yapo_fast.cli.vllm import generate_to_file

    gen_out = Path(out_path).with_name("generate.jsonl")
    gen_out.with_name("generate.jsonl.partial").write_text(
        json.dumps({"index": 0, "prompt": job["gen_prompts"][0], "output": "KEPT", "n_tokens": 0}) + '\n{"cut'
    )
    h = yapo_fast.patch(llm, bipo, job["bipo_m"])
    out["generate_stats"] = generate_to_file(llm, job["gen_prompts"], gen_out, max_tokens=8, chat=True, chunk=2)
    out["generate_direct"] = [
        o.outputs[0].text
        for o in llm.generate(
            [format_prompt(llm.get_tokenizer(), p) for p in job["gen_prompts"]],
            SamplingParams(max_tokens=8, temperature=0, seed=0),
            use_tqdm=False,
        )
    ]
    h.remove()
    out["generate_file"] = str(gen_out)

    errors = {}
    for what, call in {
        "bad_layer": lambda: yapo_fast.patch(
            llm, yapo_fast.SteeringVector.from_dense(bipo.values, method="bipo", layer=99)
        ),
        "unknown_name": lambda: gen(prompts[:1], [yapo_fast.steer_args("nope")]),
        "yapo_without_sae": lambda: yapo_fast.patch(llm, yapo),
    }.items():
        try:
            call()
            errors[what] = None
        except Exception as exc:  # recorded for the test to check type and message
            errors[what] = f"{type(exc).__name__}: {exc}"
    out["errors"] = errors
    out["status"] = vllm_patch.status(llm)
    with open(out_path, "w") as f:
        json.dump(out, f)


def tensor_parallel(job_path: str, out_path: str) -> None:
    """patch / per-request vectors on an engine of job["tp"] workers (multiprocessing executor,
    eager: what is checked is that every worker gets the vectors, not compilation, which main()
    covers); every output's token ids."""
    from vllm import LLM, SamplingParams

    import yapo_fast

    job = json.loads(open(job_path).read())
    llm = LLM(
        model=job["model"],
        dtype="float32",
        max_model_len=128,
        max_num_seqs=8,
        seed=0,
        tensor_parallel_size=job["tp"],
        distributed_executor_backend="mp",
        enforce_eager=True,
        kv_cache_memory_bytes=kv_cache_bytes(0.125),
    )
    prompts = [{"prompt_token_ids": ids} for ids in job["prompt_ids"]]

    def gen(extra=None):
        sps = [
            SamplingParams(
                max_tokens=job["max_tokens"],
                temperature=0,
                ignore_eos=True,
                extra_args=None if extra is None else extra[i],
            )
            for i in range(len(prompts))
        ]
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sps, use_tqdm=False)]

    sae = yapo_fast.load_sae(job["sae"])
    yapo, bipo = yapo_fast.load_vector(job["yapo"]), yapo_fast.load_vector(job["bipo"])
    out = {"base": gen()}
    with yapo_fast.patch(llm, yapo, 1.5, sae=sae):
        out["yapo"] = gen()
    with yapo_fast.patch(llm, bipo, 1.0):
        out["bipo"] = gen()
    out["after"] = gen()
    yapo_fast.register_vector(llm, "yapo", yapo, sae=sae)
    yapo_fast.register_vector(llm, "bipo", bipo)
    out["mixed"] = gen([yapo_fast.steer_args(n, m) for n, m in job["mixed"]])
    out["status"] = yapo_fast.integrations.vllm_patch.status(llm)
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    try:
        if sys.argv[1] == "tp":
            tensor_parallel(sys.argv[2], sys.argv[3])
        else:
            main(sys.argv[1], sys.argv[2])
    except Exception:
        traceback.print_exc()
        sys.exit(1)
