"""Serving throughput of the vLLM plugin on the default model (SmolLM2-135M-Instruct, CPU, float32),
every ratio measured in one run:

- output tokens/s of the patched engine (YaPO with negative entries; BiPO) vs the same engine
  unsteered, batch 64 and 256, 128 new tokens (EOS ignored, greedy);
- per-request vectors: 1 shared, 8 and 64 distinct vectors in one batch (extra_args) vs unsteered;
- transformers `generate` + yapo_fast.steer (what users do today) at the same batch sizes.

    .venv/bin/pytest bench/bench_vllm.py -s -p no:cacheprovider        # or, without pytest:
    .venv/bin/python bench/bench_vllm.py engine OUT.json               # the vLLM half only

Knobs: YAPO_BENCH_BATCHES (default "64,256"), YAPO_BENCH_NEW_TOKENS (128), YAPO_BENCH_HF_BATCHES
(default "64"; transformers at 256 takes many minutes on 2 cores), YAPO_BENCH_REPEATS (2: best of N,
alternating steered/unsteered runs so background load hits both alike), YAPO_FAST_LAYERS (which
layers carry the op; default all 30).
Results: bench/results/vllm.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

BATCHES = [int(x) for x in os.environ.get("YAPO_BENCH_BATCHES", "64,256").split(",")]
HF_BATCHES = [int(x) for x in os.environ.get("YAPO_BENCH_HF_BATCHES", "64").split(",") if x]
NEW_TOKENS = int(os.environ.get("YAPO_BENCH_NEW_TOKENS", "128"))
REPEATS = int(os.environ.get("YAPO_BENCH_REPEATS", "2"))
LAYER = 15
RESULTS = Path(__file__).parent / "results" / "vllm.json"


def make_vectors(tmp: Path, n_extra: int = 64):
    import yapo_fast
    from yapo_fast.integrations.sae_lens_loading import save_sae

    sae = yapo_fast.SAE.random("jumprelu", 576, 4608, layer=LAYER, seed=1, name="bench-jumprelu-576x4608")
    save_sae(sae, tmp / "sae")
    paths = []
    for i in range(n_extra):
        g = torch.Generator().manual_seed(100 + i)
        latent = torch.zeros(4608)
        ids = torch.randperm(4608, generator=g)[:64]
        latent[ids[:32]] = 1.0 + torch.rand(32, generator=g)
        latent[ids[32:]] = -(0.5 + torch.rand(32, generator=g))
        v = yapo_fast.SteeringVector.from_latent(latent, layer=LAYER, sae=sae)
        paths.append(str(v.save(tmp / f"yapo{i}.safetensors")))
    bipo = yapo_fast.SteeringVector.from_dense(0.5 * torch.randn(576, generator=torch.Generator().manual_seed(5)),
                                               method="bipo", layer=LAYER)
    bipo.save(tmp / "bipo.safetensors")
    return sae, paths, str(tmp / "bipo.safetensors")


def prompts(n: int) -> list[str]:
    from yapo_fast.data import bipo_csv_path, load_pairs

    qs = [p.prompt for p in load_pairs(bipo_csv_path("hallucination"))]
    return [qs[i % len(qs)] for i in range(n)]


def engine_main(out_path: str) -> None:
    import tempfile

    from vllm import LLM, SamplingParams

    import yapo_fast
    from yapo_fast.chat import format_prompt

    tmp = Path(tempfile.mkdtemp(prefix="yapo-bench-vllm-"))
    sae, yapo_paths, bipo_path = make_vectors(tmp)
    t0 = time.time()
    llm = LLM(model=str(yapo_fast.model.default_model_dir()), dtype="float32", max_model_len=512,
              max_num_seqs=max(BATCHES), gpu_memory_utilization=0.3, seed=0)
    res: dict = {"startup_s": time.time() - t0, "new_tokens": NEW_TOKENS, "runs": {}}
    tok = llm.get_tokenizer()
    texts = [format_prompt(tok, p) for p in prompts(max(BATCHES))]
    yapo = yapo_fast.load_vector(yapo_paths[0])
    bipo = yapo_fast.load_vector(bipo_path)
    for i, p in enumerate(yapo_paths):
        yapo_fast.register_vector(llm, f"v{i}", p, sae=sae)

    def timed(batch, extra=None):
        sps = [SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True,
                              extra_args=None if extra is None else extra(i)) for i in range(batch)]
        t = time.perf_counter()
        outs = llm.generate(texts[:batch], sps, use_tqdm=False)
        dt = time.perf_counter() - t
        return sum(len(o.outputs[0].token_ids) for o in outs) / dt

    def distinct(k):
        return lambda i: {"yapo": {"vector": f"v{i % k}"}}

    timed(8)  # warm-up
    for batch in BATCHES:
        best: dict = {}
        for _ in range(REPEATS):
            for name, run in [
                ("unsteered", lambda: timed(batch)),
                ("patched_yapo", None), ("patched_bipo", None),
                ("per_request_1", lambda: timed(batch, distinct(1))),
                ("per_request_8", lambda: timed(batch, distinct(8))),
                ("per_request_64", lambda: timed(batch, distinct(64))),
            ]:
                if name == "patched_yapo":
                    with yapo_fast.patch(llm, yapo, 1.0, sae=sae):
                        tps = timed(batch)
                elif name == "patched_bipo":
                    with yapo_fast.patch(llm, bipo, 1.0):
                        tps = timed(batch)
                else:
                    tps = run()
                best[name] = max(best.get(name, 0.0), tps)
                print(f"batch {batch} {name}: {tps:.1f} output tok/s", flush=True)
        res["runs"][str(batch)] = best
    with open(out_path, "w") as f:
        json.dump(res, f, indent=2)


def hf_tokens_per_s(batch: int) -> float:
    import yapo_fast
    from yapo_fast.chat import format_prompt

    model, tok = yapo_fast.load_model(None, dtype=torch.float32)
    tok.padding_side = "left"
    with __import__("tempfile").TemporaryDirectory() as tmp:
        sae, paths, _ = make_vectors(Path(tmp), n_extra=1)
        vec = yapo_fast.load_vector(paths[0])
    enc = tok([format_prompt(tok, p) for p in prompts(batch)], return_tensors="pt", padding=True)
    with torch.no_grad(), yapo_fast.steer(model, vec, 1.0, sae=sae):
        t = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        dt = time.perf_counter() - t
    return (out.shape[1] - enc["input_ids"].shape[1]) * batch / dt


def test_vllm_serving_throughput():
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    engine_out = RESULTS.with_name("vllm_engine.json")
    proc = subprocess.run([sys.executable, __file__, "engine", str(engine_out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-5000:]
    res = json.loads(engine_out.read_text())
    res["transformers_steered"] = {str(b): hf_tokens_per_s(b) for b in HF_BATCHES}
    summary = {}
    for b, runs in res["runs"].items():
        base = runs["unsteered"]
        summary[b] = {f"{k}/unsteered": v / base for k, v in runs.items() if k != "unsteered"}
        summary[b]["per_request_8/per_request_1"] = runs["per_request_8"] / runs["per_request_1"]
        summary[b]["per_request_64/per_request_1"] = runs["per_request_64"] / runs["per_request_1"]
        if b in res["transformers_steered"]:
            summary[b]["patched_yapo/transformers_steered"] = runs["patched_yapo"] / res["transformers_steered"][b]
    res["ratios"] = summary
    RESULTS.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["engine"]:
        engine_main(sys.argv[2])
    elif sys.argv[1:2] == ["hf"]:
        for b in [int(x) for x in sys.argv[2].split(",")]:
            print(f"transformers + yapo_fast.steer, batch {b}: {hf_tokens_per_s(b):.1f} output tok/s", flush=True)
