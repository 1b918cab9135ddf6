"""Serving throughput of the vLLM plugin on the default model (SmolLM2-135M-Instruct, CPU, float32).

Engine (one vLLM engine, prefix caching off so every configuration does the same prefill work),
rounds of interleaved configurations (A/B/A/B: background load hits all alike); medians over rounds:
- batch 64 and 256, 128 new tokens (EOS ignored, greedy): unsteered; ``yapo_fast.patch`` with a YaPO
  vector (64 entries, 32 negative) and with a BiPO vector;
- per-request vectors (batch 64 by default): 1 vector shared by all requests, 8, 64 and 256 distinct
  vectors in one batch (extra_args; 64 entries each, 32 negative);
- transformers ``generate`` (what users do today), unsteered and with ``yapo_fast.steer`` (the same
  YaPO vector), at the same batch sizes, each in a fresh process between the engine's rounds.
Ratios: patched / unsteered and per-request K / per-request 1 within the engine; vLLM / transformers.

    nice -n 10 .venv/bin/python bench/bench_vllm.py engine bench/results/vllm.json   # the whole run
    bash scripts/bench.sh bench/bench_vllm.py -s -k serving                           # same, via pytest

Knobs: YAPO_BENCH_BATCHES ("64,256"), YAPO_BENCH_PER_REQUEST_BATCHES ("64"), YAPO_BENCH_HF_BATCHES
("64,256"; "" skips transformers), YAPO_BENCH_HF_ROUNDS (= ROUNDS), YAPO_BENCH_NEW_TOKENS (128), YAPO_BENCH_ROUNDS (2),
YAPO_BENCH_PLAN (e.g. "64:unsteered,patched_yapo;256:unsteered,patched_yapo": batches and configs),
YAPO_BENCH_TRAINED (comma-separated trained YaPO vector files of the shipped SAE: configs "patched_<stem>";
the first also at 256 distinct multipliers per batch, "per_request_256_trained"),
YAPO_FAST_LAYERS (layers carrying the op; default all 30). Results (raw samples, medians, ratios)
are rewritten after every measurement, so a stopped run keeps what it measured.
The op alone per decode step (CPU, and the Triton path on CUDA): ``-k op_``, see below.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from yapo_fast.eval.vllm import kv_cache_bytes

BATCHES = [int(x) for x in os.environ.get("YAPO_BENCH_BATCHES", "64,256").split(",") if x]
PER_REQUEST_BATCHES = [int(x) for x in os.environ.get("YAPO_BENCH_PER_REQUEST_BATCHES", "64").split(",") if x]
HF_BATCHES = [int(x) for x in os.environ.get("YAPO_BENCH_HF_BATCHES", "64,256").split(",") if x]
NEW_TOKENS = int(os.environ.get("YAPO_BENCH_NEW_TOKENS", "128"))
ROUNDS = int(os.environ.get("YAPO_BENCH_ROUNDS", "2"))
HF_ROUNDS = int(os.environ.get("YAPO_BENCH_HF_ROUNDS", str(ROUNDS)))  # a transformers run at 256 is ~15 min
# trained YaPO vectors (of the shipped SAE) to patch as well, e.g. bench/artifacts/vectors/*.safetensors
TRAINED = [p for p in os.environ.get("YAPO_BENCH_TRAINED", "").split(",") if p]
PLAN = os.environ.get("YAPO_BENCH_PLAN", "")  # overrides the batch/config lists: "64:cfg,cfg;256:cfg"
LAYER = 15
RESULTS = Path(__file__).parent / "results" / "vllm.json"


def make_vectors(tmp: Path, n_extra: int = 256):
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
    bipo = yapo_fast.SteeringVector.from_dense(
        0.5 * torch.randn(576, generator=torch.Generator().manual_seed(5)), method="bipo", layer=LAYER
    )
    bipo.save(tmp / "bipo.safetensors")
    return sae, paths, str(tmp / "bipo.safetensors")


def prompts(n: int) -> list[str]:
    from yapo_fast.data.pairs import bipo_csv_path, load_pairs

    qs = [p.prompt for p in load_pairs(bipo_csv_path("hallucination"))]
    return [qs[i % len(qs)] for i in range(n)]


def summarize(res: dict) -> None:
    """Medians over rounds, and the ratios, from res["samples"][batch][config] = [tok/s, ...]."""
    med = {b: {k: statistics.median(v) for k, v in runs.items()} for b, runs in res["samples"].items()}
    res["median_tok_s"] = med
    ratios = {}
    for b, m in med.items():
        r = ratios[b] = {}
        base = m.get("unsteered")
        for k, v in m.items():
            if base and k != "unsteered" and not k.startswith("hf_"):
                r[f"{k}/unsteered"] = v / base
        for k in ("per_request_8", "per_request_64", "per_request_256"):
            if k in m and "per_request_1" in m:
                r[f"{k}/per_request_1"] = m[k] / m["per_request_1"]
        if base and "hf_unsteered" in m:
            r["vllm_unsteered/hf_unsteered"] = base / m["hf_unsteered"]
        if "patched_yapo" in m and "hf_steered" in m:
            r["vllm_patched_yapo/hf_steered"] = m["patched_yapo"] / m["hf_steered"]
        if "hf_steered" in m and "hf_unsteered" in m:
            r["hf_steered/hf_unsteered"] = m["hf_steered"] / m["hf_unsteered"]
    res["ratios"] = ratios


def _save(res: dict, out_path: str) -> None:
    summarize(res)
    tmp = Path(out_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(out_path)


def engine_main(out_path: str) -> None:
    import tempfile

    from vllm import LLM, SamplingParams

    import yapo_fast
    from yapo_fast.chat import format_prompt

    tmp = Path(tempfile.mkdtemp(prefix="yapo-bench-vllm-"))
    sae, yapo_paths, bipo_path = make_vectors(tmp)
    t0 = time.time()
    # Prefix caching off: with it, repeated unsteered runs would reuse their prompts' KV while
    # patch() (which resets the cache) and salted per-request runs recompute theirs.
    llm = LLM(
        model=str(yapo_fast.model.default_model_dir()),
        dtype="float32",
        max_model_len=512,
        max_num_seqs=max(BATCHES + PER_REQUEST_BATCHES),
        kv_cache_memory_bytes=kv_cache_bytes(4),
        seed=0,
        enable_prefix_caching=False,
    )
    res: dict = {
        "startup_s": time.time() - t0,
        "new_tokens": NEW_TOKENS,
        "rounds": ROUNDS,
        "layers": os.environ.get("YAPO_FAST_LAYERS", "all"),
        "samples": {},
        "command": " ".join([sys.executable] + sys.argv),
    }
    tok = llm.get_tokenizer()
    texts = [format_prompt(tok, p) for p in prompts(max(BATCHES + PER_REQUEST_BATCHES))]
    yapo = yapo_fast.load_vector(yapo_paths[0])
    bipo = yapo_fast.load_vector(bipo_path)
    for i, p in enumerate(yapo_paths):
        yapo_fast.register_vector(llm, f"v{i}", p, sae=sae)

    def timed(batch, extra=None):
        sps = [
            SamplingParams(
                max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, extra_args=None if extra is None else extra(i)
            )
            for i in range(batch)
        ]
        t = time.perf_counter()
        outs = llm.generate(texts[:batch], sps, use_tqdm=False)
        dt = time.perf_counter() - t
        return sum(len(o.outputs[0].token_ids) for o in outs) / dt

    def distinct(k):
        return lambda i: {"yapo": {"vector": f"v{i % k}"}}

    def patched(vec, **kw):
        def run(batch):
            with yapo_fast.patch(llm, vec, 1.0, **kw):
                return timed(batch)

        return run

    configs = {"unsteered": lambda b: timed(b), "patched_yapo": patched(yapo, sae=sae), "patched_bipo": patched(bipo)}
    for path in TRAINED:  # trained vectors on the shipped SAE: "patched_<file stem>"
        configs[f"patched_{Path(path).stem}"] = patched(yapo_fast.load_vector(path), sae=yapo_fast.load_sae())
    per_request = {f"per_request_{k}": (lambda b, k=k: timed(b, distinct(k))) for k in (1, 8, 64, 256)}
    if TRAINED:  # a trained vector at 256 distinct multipliers: 256 (vector, multiplier) slots in one batch
        yapo_fast.register_vector(llm, "t0", TRAINED[0], sae=yapo_fast.load_sae())
        per_request["per_request_256_trained"] = lambda b: timed(
            b, lambda i: {"yapo": {"vector": "t0", "multiplier": 0.5 + i / 256}}
        )
    every = {**configs, **per_request}
    if PLAN:  # "64:unsteered,patched_yapo;256:unsteered" (a time-boxed run on a loaded machine)
        plan = [
            (int(b), [n.strip() for n in names.split(",")])
            for b, names in (item.split(":") for item in PLAN.split(";") if item)
        ]
    else:
        plan = [
            (b, [*(configs if b in BATCHES else []), *(per_request if b in PER_REQUEST_BATCHES else [])])
            for b in sorted(set(BATCHES + PER_REQUEST_BATCHES))
        ]
    timed(8)  # warm-up

    def record(r, b, name, tps):
        res["samples"].setdefault(str(b), {}).setdefault(name, []).append(tps)
        print(f"round {r} batch {b} {name}: {tps:.1f} output tok/s", flush=True)
        _save(res, out_path)

    # Rounds inside each batch size, so a batch size's ratios are complete after its own rounds
    # even when a long run is stopped later. Configurations alternate A/B/C then C/B/A: a load that
    # drifts during a round favours no configuration over the pair of rounds.
    for b, names in plan:
        for r in range(ROUNDS):
            for name in names if r % 2 == 0 else names[::-1]:
                record(r, b, name, every[name](b))
    for b in HF_BATCHES:  # transformers in a fresh process (no vLLM import there), engine idle
        for r in range(HF_ROUNDS):
            for steered in (False, True):
                record(r, b, "hf_steered" if steered else "hf_unsteered", hf_subprocess(b, steered))


def hf_subprocess(batch: int, steered: bool) -> float:
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, __file__, "hf", str(batch), "steered" if steered else "unsteered"],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"transformers run failed:\n{proc.stderr[-4000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def hf_tokens_per_s(batch: int, steered: bool) -> float:
    """transformers generate (greedy, 128 new tokens forced), unsteered or with yapo_fast.steer."""
    import contextlib
    import tempfile

    import yapo_fast
    from yapo_fast.chat import format_prompt

    model, tok = yapo_fast.load_model(None, dtype=torch.float32)
    tok.padding_side = "left"
    with tempfile.TemporaryDirectory() as tmp:
        sae, paths, _ = make_vectors(Path(tmp), n_extra=1)
        vec = yapo_fast.load_vector(paths[0])
    enc = tok(
        [format_prompt(tok, p) for p in prompts(batch)], return_tensors="pt", padding=True, add_special_tokens=False
    )
    ctx = yapo_fast.steer(model, vec, 1.0, sae=sae) if steered else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        model.generate(
            **{k: v[:2] for k, v in enc.items()}, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id
        )  # warm-up (first-call allocations, hooks)
        t = time.perf_counter()
        out = model.generate(
            **enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
        )
        dt = time.perf_counter() - t
    return (out.shape[1] - enc["input_ids"].shape[1]) * batch / dt


def test_vllm_serving_throughput():
    """The whole serving run (about an hour on 2 cores; not in scripts/bench.sh's default set)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, __file__, "engine", str(RESULTS)])
    assert proc.returncode == 0
    print(json.dumps(json.loads(RESULTS.read_text())["ratios"], indent=2))


# ---- the op alone, per decode step (no engine) ------------------------------------------------
# What the plugin adds to one forward pass: at each layer carrying the op, the custom-op call
# (hidden + residual, steered where this step's plan says so) plus the zeros that the next layer's
# fused add-norm then adds, and once per step the plan (slot lookup, repeat_interleave, gathers).
# CPU: torch path, default model shapes. CUDA (where a GPU exists): the Triton path at serving
# shapes, d_model 576 (4608-wide SAE) and a 7B-class 4096 (16384-wide SAE); deselected without CUDA.
# Vectors: 64 entries, 32 negative (JumpReLU). T single-token requests (a decode step).
#     bash scripts/bench.sh bench/bench_vllm.py -k op_
OP_MODULE = "bench_vllm_op"
N_LAYERS = 30
OP_CASES = [
    "installed_30_no_vector",
    "installed_1_no_vector",
    "patch",
    "per_request_8",
    "per_request_64",
    "plan_only_per_request_64",
]


def _op_state(device, d_model, d_sae, n_vectors):
    import yapo_fast
    from yapo_fast.integrations.vllm_state import SteerState

    sae = yapo_fast.SAE.random("jumprelu", d_model, d_sae, layer=LAYER, seed=1)
    st = SteerState()
    st.device = torch.device(device)
    for i in range(n_vectors):
        g = torch.Generator().manual_seed(100 + i)
        latent = torch.zeros(d_sae)
        ids = torch.randperm(d_sae, generator=g)[:64]
        latent[ids[:32]] = 1.0 + torch.rand(32, generator=g)
        latent[ids[32:]] = -(0.5 + torch.rand(32, generator=g))
        st.register(f"v{i}", yapo_fast.SteeringVector.from_latent(latent, layer=LAYER, sae=sae), sae)
    return st


class _OpState:
    state = None


def _bench_steer_layer(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
    return _OpState.state.apply(hidden, residual, layer)


# Registered as the plugin registers its op (vLLM's direct_register_custom_op: a schema and a backend
# kernel, no autograd wrapper; vLLM itself is not imported here), so the timing includes the dispatcher.
_bench_lib = torch.library.Library("yapo_fast_bench", "FRAGMENT")
_bench_lib.define("steer_layer(Tensor hidden, Tensor residual, int layer) -> Tensor")
for _key in ("CPU", "CUDA"):
    _bench_lib.impl("steer_layer", _bench_steer_layer, _key)


def op_step_fn(device: str, T: int, d_model: int, d_sae: int, case: str):
    """A callable doing the op's work for one decode step of T single-token requests (see OP_CASES):
    installed_30_no_vector / installed_1_no_vector: op on all 30 layers / only the vector's layer,
    nothing steered; patch: one vector for every request; per_request_K: K distinct vectors;
    plan_only_per_request_64: the per-step plan alone."""
    n_vec = {"patch": 1, "per_request_8": 8, "per_request_64": 64, "plan_only_per_request_64": 64}.get(case, 0)
    st = _op_state(device, d_model, d_sae, n_vec)
    hidden = torch.randn(T, d_model, device=device)
    residual = torch.randn(T, d_model, device=device)
    rids = [f"r{i}" for i in range(T)]
    counts = torch.ones(T, dtype=torch.int64).numpy()
    args = {r: {"yapo": {"vector": f"v{i % n_vec}"}} for i, r in enumerate(rids)} if n_vec else {}
    if case == "patch":
        st.set_global("v0", 1.0)
        args = {}
    layers = [] if case.startswith("plan_only") else [LAYER] if case == "installed_1_no_vector" else range(N_LAYERS)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        _OpState.state = st
        if n_vec:
            st.build_plan_ids(st.request_slots(rids, args.get), counts)
        out = None
        for layer in layers:
            out = torch.ops.yapo_fast_bench.steer_layer(hidden, residual, layer)
            torch.zeros_like(residual)
        sync()
        return out

    return step, st


def _op_params():
    cpu = [("cpu", T, 576, 4608, c) for T in (64, 256) for c in OP_CASES]
    gpu = [("cuda", T, d, w, c) for T in (64, 256) for d, w in ((576, 4608), (4096, 16384)) for c in OP_CASES]
    return cpu + [pytest.param(*g, marks=pytest.mark.gpu) for g in gpu]  # gpu: deselected without CUDA


@pytest.mark.parametrize("device,T,d_model,d_sae,case", _op_params())
def test_op_per_decode_step(benchmark, record, device, T, d_model, d_sae, case):
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("YAPO_BENCH_THREADS", "1")))
    step, st = op_step_fn(device, T, d_model, d_sae, case)
    ref = step()  # warm-up: prepares slots and tables
    if case in ("patch", "per_request_8", "per_request_64"):
        assert st.steered and LAYER in st.tables and ref is not None  # the timed step really steers
    benchmark.group = f"op per decode step, {device}, T={T}, d_model={d_model}, d_sae={d_sae}, {N_LAYERS} layers"
    benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=2)
    record(OP_MODULE, benchmark.group, case, benchmark)


if __name__ == "__main__":
    if sys.argv[1:2] == ["engine"]:
        engine_main(sys.argv[2])
    elif sys.argv[1:2] == ["hf"]:
        print(hf_tokens_per_s(int(sys.argv[2]), sys.argv[3] == "steered"), flush=True)
