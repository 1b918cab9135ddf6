"""Runs a tiny random model of one architecture in a vLLM engine (CPU, float32, eager), patched with a
YaPO vector, and writes the greedy token ids: tests/test_vllm_models.py compares them with
transformers + yapo_fast.steer. A separate process per architecture (vLLM spawns workers).

    python tests/vllm_models.py job.json out.json
"""

import json
import sys


def main(job_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    import yapo_fast
    from yapo_fast.eval.vllm import kv_cache_bytes

    job = json.loads(open(job_path).read())
    llm = LLM(
        model=job["model"],
        dtype="float32",
        max_model_len=128,
        max_num_seqs=4,
        kv_cache_memory_bytes=kv_cache_bytes(0.0625),
        skip_tokenizer_init=True,  # the tiny models have no tokenizer: prompts are token ids
        enforce_eager=True,
        seed=0,
    )
    prompts = [{"prompt_token_ids": ids} for ids in job["prompt_ids"]]
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0, ignore_eos=True, detokenize=False)

    def gen():
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

    out = {"base": gen()}
    try:
        sae = yapo_fast.load_sae(job["sae"])
        with yapo_fast.patch(llm, yapo_fast.load_vector(job["yapo"]), job["multiplier"], sae=sae):
            out["yapo"] = gen()
    except yapo_fast.YapoFastError as exc:  # an architecture the plugin cannot steer: refused by name
        out["refused"] = str(exc)
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
