"""Benchmarks of the lean trainer (yapo_fast.train) against the naive one (tests/naive_trainer.py),
measured in the same run on the default model (SmolLM2-135M-Instruct, CPU, float32) and the
shipped SAE (a calibrated random JumpReLU SAE at layer 15 when none is shipped).

    YAPO_BENCH_THREADS=1 .venv/bin/pytest bench/bench_trainer.py -s -p no:cacheprovider -k "paired or ratio or blend"
    YAPO_BENCH_THREADS=1 .venv/bin/pytest bench/bench_trainer.py -s -p no:cacheprovider -k "profile or convergence or step_forward or peak_memory"
    (the end-to-end runs: -k "lean or naive"; slow on a loaded machine)

The primary measurement is test_trainer_epoch_paired: one epoch of both trainers, step by step in
turn, so that both see the same machine load (on the shared 2-core machine the load swings by 3x
within minutes, which makes back-to-back end-to-end timings meaningless). Knobs: YAPO_BENCH_PAIRS
(BiPO hallucination pairs timed, default 20: one naive epoch of 200 pairs takes far longer than the
10-minute budget here; per-200-pair figures are scaled; YAPO_BENCH_PAIRS=200 is the issue's setting,
about an hour of one core on a quiet machine), YAPO_BENCH_LAYER (layer of the random SAE when none is
shipped; 15), YAPO_BENCH_CURVE_PAIRS / _EPOCHS / _LR / _WARMUP / _HOLDOUT (loss curves and held-out
accuracy), YAPO_BENCH_DATA (paired run on hallucination, blend_mc or blend_pairs), YAPO_BENCH_PAIRED_FROM
(ratio of a paired run cut short, from its partial file), YAPO_BENCH_PROFILE_PAIRS, YAPO_BENCH_THREADS (torch threads; default: torch's). Run the paired bench with
MALLOC_MMAP_THRESHOLD_=65536 for its per-trainer peak memory (see PhasePeak).

Results: bench/results/trainer.json (timings, ratios, FLOP bound, peak memory, profile summary),
bench/results/trainer_profile.txt, bench/results/trainer_curves.jsonl and .png.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from naive_trainer import NaiveTrainer  # noqa: E402

import yapo_fast  # noqa: E402
from yapo_fast.data.pairs import bipo_csv_path, load_pairs  # noqa: E402
from yapo_fast.train.cache import tokenize_pairs  # noqa: E402

N_PAIRS = int(os.environ.get("YAPO_BENCH_PAIRS", "20"))
RANDOM_SAE_LAYER = int(os.environ.get("YAPO_BENCH_LAYER", "15"))
CURVE_EPOCHS = int(os.environ.get("YAPO_BENCH_CURVE_EPOCHS", "5"))
CURVE_PAIRS = int(os.environ.get("YAPO_BENCH_CURVE_PAIRS", "12"))
BATCH = 4
RESULTS_DIR = Path(__file__).parent / "results"
# Results of earlier runs (other -k selections) are kept and updated, not thrown away.
RESULTS: dict = (
    json.loads((RESULTS_DIR / "trainer.json").read_text()) if (RESULTS_DIR / "trainer.json").exists() else {}
)
if os.environ.get("YAPO_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["YAPO_BENCH_THREADS"]))


def calibrated_random_sae(model, tok, pairs, layer: int, l0: float = 64.0):
    """SAE.random (d_in 576, d_sae 4608, JumpReLU) with per-latent thresholds set so that each latent
    fires on a fraction l0/d_sae of real layer-L tokens (the shipped SAE's target L0 of 64); the
    raw random thresholds would leave ~2000 latents active per token on real residual norms."""
    from yapo_fast.integrations.hf_hooks import capture_layer_output

    sae = yapo_fast.SAE.random(
        "jumprelu",
        model.config.hidden_size,
        8 * model.config.hidden_size,
        layer=layer,
        name="random-jumprelu-calibrated",
    )
    toks = tokenize_pairs(tok, pairs[:16])
    states = []
    with torch.no_grad():
        for t in toks:
            with capture_layer_output(model, layer) as seen:
                model(torch.tensor([t.prompt + t.chosen]))
            states.append(seen[0][0, 1:])  # position 0 (massive-norm BOS-like state) left out
    pre = sae.pre_activation(torch.cat(states))
    sae.threshold = torch.quantile(pre, 1 - l0 / sae.d_sae, dim=0).clamp_min(1e-3).contiguous()
    sae._hash = None
    return sae


@functools.cache
def setup():
    model, tok = yapo_fast.load_model()
    pairs = load_pairs(bipo_csv_path("hallucination"), limit=200)
    try:
        sae = yapo_fast.load_sae()
        origin = "shipped"
    except yapo_fast.YapoFastError:
        sae = calibrated_random_sae(model, tok, pairs, RANDOM_SAE_LAYER)
        origin = "random (calibrated to L0 64)"
    RESULTS["setup"] = {
        "model": yapo_fast.DEFAULT_MODEL,
        "sae": sae.name,
        "sae_origin": origin,
        "sae_kind": sae.kind,
        "d_sae": sae.d_sae,
        "layer": sae.layer,
        "pairs_timed": N_PAIRS,
        "batch_size": BATCH,
        "torch_threads": torch.get_num_threads(),
        "load_avg_at_start": os.getloadavg(),
    }
    return model, tok, sae, pairs


class PeakRSS:
    """Peak resident memory above the starting level, sampled every 20 ms (torch's CPU allocator
    is invisible to tracemalloc)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.mib = (self.peak - self.base) / 2**20


# ---- FLOP model ------------------------------------------------------------------------------
def flops(model, sae, token_lengths, layer, l0: float, batches=None) -> dict:
    """Floating-point operations (2 x multiply-adds) of one epoch, per trainer, from the real token
    lengths. Per token and layer: the linear maps (q, k, v, o, gate, up, down) and attention (QK and
    AV over the keys the token sees); a backward pass with respect to activations only (no weight
    gradients) costs the linear maps once more and attention twice. See bench/README.md (trainer).

    naive (per sequence prompt+response, chosen and rejected apart): steered forward through all N
    layers, LM head at every position, SAE encode + 2 decodes at every position; backward through
    layers L+1..N-1, the LM head and one decode; the reference forward (N layers, LM head).
    lean (per pair, prompt once): cache pass = N layers on prompt+both responses, LM head where a
    response token is predicted, SAE encode; step = forward + backward of layers L+1..N-1, that LM
    head, and the sparse correction (l0 active latents per token); in the last layer only the keys
    and values of positions whose output is not read. No padding on either side: that is the bound
    exact savings can reach. `batches` (lists of (P, Rc, Rr) per training batch) adds the naive
    trainer's real cost, every sequence padded to its batch's longest."""
    cfg = model.config
    d, ff, V, N = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    lin = d * q + 2 * d * kv + q * d + 3 * d * ff  # per token per layer
    kv_only = 2 * d * kv
    a = N - 1 - layer  # layers after L
    S = sae.d_sae

    def layers(n_layers, n_tokens, keys):  # keys: total keys seen by these tokens
        return n_layers * (lin * n_tokens + 2 * q * keys)

    def naive_seq(T):
        keys = T * (T + 1) // 2
        fwd = layers(N, T, keys) + V * d * T + 3 * d * S * T
        bwd = layers(a, T, 2 * keys) + V * d * T + d * S * T
        ref = layers(N, T, keys) + V * d * T
        return fwd + bwd + ref

    naive = lean_cache = lean_steps = 0
    for P, Rc, Rr in token_lengths:
        naive += naive_seq(P + Rc) + naive_seq(P + Rr)
        keys = P * (P + 1) // 2 + sum(R * P + R * (R + 1) // 2 for R in (Rc, Rr))
        T = P + Rc + Rr
        resp = Rc + Rr  # positions whose next token is a response token (LM head only there)
        last = lin * (resp - 1) + kv_only * (T - resp + 1)  # last layer: full where read, else k and v
        lean_cache += layers(N - 1, T, keys) + last + 2 * q * keys + V * d * resp + d * S * T
        fwd = layers(a - 1, T, keys) + last + 2 * q * keys + V * d * resp + l0 * d * T
        bwd = layers(a - 1, T, 2 * keys) + last + 4 * q * keys + V * d * resp + l0 * d * T
        lean_steps += fwd + bwd
    out = {
        "naive": 2 * naive,
        "lean_cache": 2 * lean_cache,
        "lean_steps": 2 * lean_steps,
        "lean": 2 * (lean_cache + lean_steps),
        "ratio_1_epoch": naive / (lean_cache + lean_steps),
        "ratio_2_epochs": 2 * naive / (lean_cache + 2 * lean_steps),
        "ratio_10_epochs": 10 * naive / (lean_cache + 10 * lean_steps),
        "ratio_steps_only": naive / lean_steps,
    }
    if batches is not None:
        padded = sum(2 * len(b) * naive_seq(max(P + max(Rc, Rr) for P, Rc, Rr in b)) for b in batches)
        out["naive_padded"] = 2 * padded
        out["ratio_1_epoch_vs_padded_naive"] = padded / (lean_cache + lean_steps)
    return out


# ---- the timed runs ----------------------------------------------------------------------------
TRAIN_KW = dict(epochs=1, batch_size=BATCH, lr=5e-4, warmup_steps=100, seed=0)


def run_naive():
    model, tok, sae, pairs = setup()
    naive = NaiveTrainer("yapo", model, tok, pairs[:N_PAIRS], sae.layer, sae=sae)
    return naive.train(**TRAIN_KW)


def run_lean():
    model, tok, sae, pairs = setup()
    return yapo_fast.train(
        "yapo", pairs[:N_PAIRS], model=model, tokenizer=tok, sae=sae, layer=sae.layer, progress=False, **TRAIN_KW
    )


DATA = os.environ.get("YAPO_BENCH_DATA", "hallucination")  # or blend_mc / blend_pairs (BLEnD, UK, localized)


def blend_sets(country: str = "UK") -> dict:
    """Cultural (BLEnD) sets: the shipped preference pairs (question -> answer) and a multiple-choice
    form (question + 4 options -> the correct letter vs a wrong one)."""
    from yapo_fast.data import blend
    from yapo_fast.data.pairs import PreferencePair

    mc = []
    for item in blend.mcq_items(country, "localized", split="train")[:200]:
        prompt = (
            item.question
            + "\n"
            + "\n".join(f"{L}. {o}" for L, o in zip("ABCD", item.options))
            + "\nAnswer with the letter of the correct option."
        )
        wrong = next(L for L in "ABCD" if L != item.answer)
        mc.append(PreferencePair(prompt, item.answer, wrong))
    return {"pairs": blend.preference_pairs(country, "localized")[:200], "multiple_choice": mc}


def bench_pairs():
    model, tok, sae, pairs = setup()
    if DATA == "hallucination":
        return pairs
    return blend_sets()[{"blend_mc": "multiple_choice", "blend_pairs": "pairs"}[DATA]]


class PhasePeak:
    """Peak resident memory of the process above its level at the start of a phase (sampled every
    10 ms). Run with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back to the system
    (otherwise glibc keeps them and later phases start from an inflated level)."""

    def __init__(self):
        self.level = self.peak = PeakRSS._rss()
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, PeakRSS._rss())

    def start(self):
        self.level = self.peak = PeakRSS._rss()

    def above_start(self) -> int:
        self.peak = max(self.peak, PeakRSS._rss())
        return self.peak - self.level

    def close(self):
        self._stop.set()


def lean_trainer(model, tok, sae, pairs):
    """The lean trainer of one epoch over `pairs`, through the public step API (yapo_fast.train's own loop)."""
    from yapo_fast.train import TrainConfig, Trainer

    cfg = TrainConfig.of("yapo", layer=sae.layer, **TRAIN_KW)
    return Trainer(cfg, pairs, model=model, tokenizer=tok, sae=sae, progress=False)


def run_paired(on_step=None):
    """One epoch of both trainers, step by step in turn (naive step k, then the lean trainer's step
    k), so that both see the same machine load: on a shared machine whose load swings, this is the
    fair ratio. Same schedule, optimizer and data. The lean trainer is yapo_fast's own Trainer
    (its cache pass first, then its steps). Peak memory per trainer: the most resident memory any
    of its steps (and its cache pass) took above the level it started from, plus for the lean
    trainer the cache it holds (exact byte count)."""
    from yapo_fast.train import batch_schedule, make_optimizer

    model, tok, sae, _ = setup()
    pairs = bench_pairs()[:N_PAIRS]
    schedule = batch_schedule(len(pairs), BATCH, 1, 0)
    naive = NaiveTrainer("yapo", model, tok, pairs, sae.layer, sae=sae)
    lean = lean_trainer(model, tok, sae, pairs)
    assert [b for _, b, _ in lean.schedule] == [b for _, b, _ in schedule]
    out = {
        "naive": 0.0,
        "lean": 0.0,
        "lean_cache": 0.0,
        "naive_losses": [],
        "lean_losses": [],
        "naive_peak_mib": 0.0,
        "lean_peak_mib": 0.0,
        "lean_cache_mib": 0.0,
        "split_mlp": lean.runner.split_mlp,
        "steps_done": 0,
        "pairs_done": 0,
        "steps": len(schedule),
        "data": DATA,
        "pairs": len(pairs),
        "sae_weights_hash": sae.weights_hash(),
    }
    v = torch.zeros(sae.d_sae, requires_grad=True)
    opt, sched = make_optimizer(v, lean.cfg, len(schedule))
    mem = PhasePeak()
    try:
        mem.start()
        t0 = time.perf_counter()
        lean.build_cache()
        out["lean_cache"] = out["lean"] = time.perf_counter() - t0
        out["lean_cache_mib"] = lean.objective.cache.memory_bytes / 2**20
        out["lean_peak_mib"] = mem.above_start() / 2**20 + out["lean_cache_mib"]
        for k, (_, batch, d) in enumerate(schedule):
            mem.start()
            t0 = time.perf_counter()
            loss = naive.step(batch, v, d, opt, sched, lean.cfg.grad_clip)["loss"]
            out["naive"] += time.perf_counter() - t0
            out["naive_losses"].append(loss)
            out["naive_peak_mib"] = max(out["naive_peak_mib"], mem.above_start() / 2**20)
            mem.start()
            t0 = time.perf_counter()
            rec = lean.step()
            out["lean"] += time.perf_counter() - t0
            out["lean_losses"].append(rec["loss"])
            out["lean_peak_mib"] = max(out["lean_peak_mib"], mem.above_start() / 2**20 + out["lean_cache_mib"])
            out["steps_done"], out["pairs_done"] = k + 1, out["pairs_done"] + len(batch)
            if on_step is not None:
                on_step(out)
    finally:
        mem.close()
    return out


def _paired_summary(out):
    return {
        **out,
        "speedup": out["naive"] / out["lean"],
        "speedup_steps_only": out["naive"] / (out["lean"] - out["lean_cache"]),
        "final_loss_abs_diff": abs(out["naive_losses"][-1] - out["lean_losses"][-1]),
        "max_loss_abs_diff": max(abs(a - b) for a, b in zip(out["naive_losses"], out["lean_losses"])),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "load_avg_after": os.getloadavg(),
    }


def test_trainer_epoch_paired(benchmark):
    setup()
    key = "paired" if DATA == "hallucination" else f"paired_{DATA}"
    partial = RESULTS_DIR / f"trainer_{key}_{N_PAIRS}.partial.json"

    def on_step(out):  # a run cut short still leaves its numbers so far
        from yapo_fast.atomic import write_text_atomic

        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        write_text_atomic(partial, json.dumps(_paired_summary(out), indent=1))

    out = benchmark.pedantic(run_paired, kwargs={"on_step": on_step}, rounds=1, iterations=1)
    RESULTS[key] = _paired_summary(out)
    if DATA != "hallucination":  # the FLOP ratio of exactly these pairs (the hallucination one: -k ratio)
        from yapo_fast.train import batch_schedule

        model, tok, sae, halluc = setup()
        toks = tokenize_pairs(tok, bench_pairs()[:N_PAIRS])
        lengths = [(len(t.prompt), len(t.chosen), len(t.rejected)) for t in toks]
        batches = [[lengths[i] for i in b] for _, b, _ in batch_schedule(len(lengths), BATCH, 1, 0)]
        f = flops(model, sae, lengths, sae.layer, _mean_l0(model, tok, sae, halluc), batches)
        RESULTS[key].update({f"flop_{k}": v for k, v in f.items() if k.startswith("ratio")})
        RESULTS[key]["mean_tokens"] = [sum(x[i] for x in lengths) / len(lengths) for i in range(3)]
    _write()
    print(json.dumps({k: v for k, v in RESULTS[key].items() if "losses" not in k}, indent=2))
    assert RESULTS[key]["final_loss_abs_diff"] <= 1e-4


def test_trainer_epoch_lean(benchmark):
    setup()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        res = benchmark.pedantic(run_lean, rounds=1, iterations=1)
        seconds = time.perf_counter() - t0
    RESULTS["lean"] = {
        "seconds": seconds,
        "cache_seconds": res.cache_seconds,
        "step_seconds": sum(r["seconds"] for r in res.losses),
        "steps": res.steps,
        "peak_rss_mib": mem.mib,
        "final_loss": res.losses[-1]["loss"],
        "losses": [r["loss"] for r in res.losses],
        "nnz_v": res.losses[-1]["nnz"],
    }


def test_trainer_epoch_naive(benchmark):
    setup()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        v, records = benchmark.pedantic(run_naive, rounds=1, iterations=1)
        seconds = time.perf_counter() - t0
    RESULTS["naive"] = {
        "seconds": seconds,
        "steps": len(records),
        "peak_rss_mib": mem.mib,
        "final_loss": records[-1]["loss"],
        "losses": [r["loss"] for r in records],
    }


def test_trainer_ratio_and_flop_bound():
    """The measured ratio (interleaved run, and the end-to-end runs when they ran) against the
    FLOP bound over exactly the pairs that run covered, and exactness (same final loss).
    YAPO_BENCH_PAIRED_FROM=<partial json> reads a paired run that was cut short."""
    from yapo_fast.train import batch_schedule

    model, tok, sae, pairs = setup()
    src = os.environ.get("YAPO_BENCH_PAIRED_FROM")
    paired = json.loads(Path(src).read_text()) if src else RESULTS["paired"]
    lean, naive = RESULTS.get("lean"), RESULTS.get("naive")
    n_total = paired.get("pairs", N_PAIRS)
    done = batch_schedule(n_total, BATCH, 1, 0)[: paired.get("steps_done", 10**9)]
    toks = tokenize_pairs(tok, pairs[:n_total])
    lengths = [(len(t.prompt), len(t.chosen), len(t.rejected)) for t in toks]
    batches = [[lengths[i] for i in b] for _, b, _ in done]
    covered = [x for b in batches for x in b]
    l0 = _mean_l0(model, tok, sae, pairs)
    f = flops(model, sae, covered, sae.layer, l0, batches)
    per_200 = lambda s: s / len(covered) * 200  # noqa: E731  (seconds per epoch of 200 pairs, scaled)
    RESULTS["ratio"] = {
        "pairs_timed": len(covered),
        "of_pairs": n_total,
        "source": src or "paired",
        "measured_speedup_1_epoch_paired": paired["speedup"],
        "measured_speedup_steps_only_paired": paired["speedup_steps_only"],
        "flop_bound_1_epoch": f["ratio_1_epoch"],
        "flop_bound_2_epochs": f["ratio_2_epochs"],
        "flop_bound_10_epochs": f["ratio_10_epochs"],
        "flop_bound_steps_only": f["ratio_steps_only"],
        "flop_ratio_1_epoch_vs_padded_naive": f["ratio_1_epoch_vs_padded_naive"],
        "naive_seconds_per_200_pair_epoch": per_200(paired["naive"]),
        "lean_seconds_per_200_pair_epoch": per_200(paired["lean"]),
        "final_loss_abs_diff": paired["final_loss_abs_diff"],
        "max_loss_abs_diff": paired.get("max_loss_abs_diff"),
        "naive_peak_mib": paired.get("naive_peak_mib"),
        "lean_peak_mib": paired.get("lean_peak_mib"),
        "sae_mean_l0": l0,
        "gflops": {k: v / 1e9 for k, v in f.items() if not k.startswith("ratio")},
        "mean_tokens": {
            "prompt": sum(x[0] for x in covered) / len(covered),
            "chosen": sum(x[1] for x in covered) / len(covered),
            "rejected": sum(x[2] for x in covered) / len(covered),
        },
    }
    if lean and naive:
        RESULTS["ratio"]["measured_speedup_end_to_end"] = naive["seconds"] / lean["seconds"]
    _write()
    print(json.dumps(RESULTS["ratio"], indent=2))
    assert RESULTS["ratio"]["final_loss_abs_diff"] <= 1e-4  # same final loss (exactness, not speed)


def _mean_l0(model, tok, sae, pairs):
    from yapo_fast.integrations.hf_hooks import capture_layer_output

    t = tokenize_pairs(tok, pairs[:4])
    n = tot = 0
    with torch.no_grad():
        for x in t:
            with capture_layer_output(model, sae.layer) as seen:
                model(torch.tensor([x.prompt + x.chosen]))
            z = sae.encode(seen[0][0])
            tot += int((z != 0).sum())
            n += z.shape[0]
    return tot / n


def test_trainer_profile():
    """Where the lean trainer's time goes: torch profiler over one epoch of PROFILE_PAIRS pairs, by
    phase (labels around the trainer's pieces) and by op (self CPU time)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from yapo_fast.train import cache as cache_mod
    from yapo_fast.train import lean as lean_mod
    from yapo_fast.train import trainer as trainer_mod

    model, tok, sae, pairs = setup()
    n = int(os.environ.get("YAPO_BENCH_PROFILE_PAIRS", "8"))
    layer = sae.layer

    def labelled(fn, label):
        def wrapper(*a, **k):
            with record_function(label(*a, **k) if callable(label) else label):
                return fn(*a, **k)

        return wrapper

    run_label = lambda self, h, pos, allowed, start, end, *a, **k: (  # noqa: E731
        "phase: layers 0..L (cache)"
        if start == 0
        else f"phase: layers L+1..N-1 {'prompt' if k.get('record') else 'responses'} ({'grad' if torch.is_grad_enabled() else 'no grad'})"
    )
    patches = [
        (lean_mod.DecoderRunner, "run", labelled(lean_mod.DecoderRunner.run, run_label)),
        (
            lean_mod.DecoderRunner,
            "token_logprobs",
            labelled(lean_mod.DecoderRunner.token_logprobs, "phase: final norm + LM head + log-softmax"),
        ),
        (cache_mod, "sparse_codes", labelled(cache_mod.sparse_codes, "phase: SAE encode (cache)")),
        (trainer_mod, "yapo_delta", labelled(trainer_mod.yapo_delta, "phase: YaPO delta")),
        (trainer_mod, "assemble", labelled(trainer_mod.assemble, "phase: batch assembly")),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, fn in patches:
        setattr(obj, name, fn)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            res = yapo_fast.train(
                "yapo",
                pairs[:n],
                model=model,
                tokenizer=tok,
                sae=sae,
                layer=layer,
                progress=False,
                epochs=1,
                batch_size=BATCH,
            )
            wall = time.perf_counter() - t0
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    phases = {e.key: e.cpu_time_total / 1e6 for e in events if e.key.startswith("phase:")}
    step_s = sum(r["seconds"] for r in res.losses)
    fwd_steps = sum(v for k, v in phases.items() if "(grad)" in k) + phases.get("phase: YaPO delta", 0.0)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    lines = [
        f"lean trainer, one epoch of {n} pairs (batch {BATCH}), wall {wall:.1f} s under the profiler: "
        f"cache {res.cache_seconds:.1f} s, steps {step_s:.1f} s",
        "phases (CPU seconds, inclusive; LM head counted in both the forward it belongs to and its own line):",
    ]
    lines += [f"  {k}: {v:.2f}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1])]
    lines += [
        f"  backward + the step's LM head forward + optimizer (= step time - the step's layer phases): "
        f"{max(step_s - fwd_steps, 0):.2f}  (backward alone: test_trainer_step_forward_vs_backward)",
        "",
        table,
    ]
    (RESULTS_DIR / "trainer_profile.txt").write_text("\n".join(lines))
    RESULTS["profile"] = {
        "pairs": n,
        "wall_s": wall,
        "cache_s": res.cache_seconds,
        "steps_s": step_s,
        "phases_s": phases,
        "top_ops": [
            {"op": e.key, "self_cpu_share": e.self_cpu_time_total / total}
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
        ],
    }
    RESULTS.pop("profile_top", None)
    _write()
    print("\n".join(lines))


def test_trainer_lean_peak_memory_by_phase():
    """The lean trainer alone over the paired bench's epoch (YAPO_BENCH_PAIRS pairs): peak resident
    memory of its cache pass and of its steps, apart, each above the level it started from (run
    with MALLOC_MMAP_THRESHOLD_=65536, see PhasePeak), plus the bytes the cache holds."""
    model, tok, sae, _ = setup()
    pairs = bench_pairs()[:N_PAIRS]
    lean = lean_trainer(model, tok, sae, pairs)
    toks = lean.tokens
    mem = PhasePeak()
    out = {
        "pairs": len(pairs),
        "cache_pass_mib": 0.0,
        "step_mib": 0.0,
        "step_worst": None,
        "sae_weights_hash": sae.weights_hash(),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }

    def n_tokens(ids):
        return sum(len(toks[i].prompt) + len(toks[i].chosen) + len(toks[i].rejected) for i in ids)

    try:
        mem.start()
        lean.build_cache()
        out["cache_pass_mib"] = mem.above_start() / 2**20
        while not lean.done:
            k = lean.next_step
            mem.start()
            lean.step()
            peak = mem.above_start() / 2**20
            if peak > out["step_mib"]:
                out["step_mib"], out["step_worst"] = peak, {"step": k, "tokens": n_tokens(lean.schedule[k][1])}
    finally:
        mem.close()
    out["cache_held_mib"] = lean.objective.cache.memory_bytes / 2**20
    RESULTS["lean_peak_memory_by_phase"] = out
    _write()
    print(json.dumps(out, indent=2))


def test_trainer_step_forward_vs_backward(benchmark):
    """One lean step on 4 cached pairs, timed directly: the forward (policy log-probs from the
    cached layer-L states, LM head at response positions, DPO loss) and the backward to v. The FLOP
    model assumes a backward with respect to activations costs about one forward (the linear maps
    once more, attention twice); this checks it on the real shapes."""
    from yapo_fast.train import TrainConfig
    from yapo_fast.train.cache import build_cache
    from yapo_fast.train.lean import DecoderRunner
    from yapo_fast.train.trainer import LeanObjective

    model, tok, sae, pairs = setup()
    runner = DecoderRunner(model)
    toks = tokenize_pairs(tok, pairs[:BATCH])
    cache = build_cache(runner, toks, list(range(BATCH)), sae.layer, sae=sae, batch_size=BATCH, progress=False)
    lean = LeanObjective(runner, cache, TrainConfig(method="yapo", layer=sae.layer, **TRAIN_KW), sae)
    v = (0.01 * torch.randn(sae.d_sae, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    batch = list(range(BATCH))
    times = {"forward": [], "backward": []}

    def step():
        t0 = time.perf_counter()
        loss = lean.loss_sum(batch, v, 1)
        t1 = time.perf_counter()
        loss.backward()
        times["forward"].append(t1 - t0)
        times["backward"].append(time.perf_counter() - t1)
        v.grad = None

    benchmark.pedantic(step, rounds=7, iterations=1, warmup_rounds=2)
    fwd = statistics.median(times["forward"][2:])
    bwd = statistics.median(times["backward"][2:])
    RESULTS["step_forward_backward"] = {
        "pairs": BATCH,
        "forward_s": fwd,
        "backward_s": bwd,
        "backward_over_forward": bwd / fwd,
        "threads": torch.get_num_threads(),
        "sae_weights_hash": sae.weights_hash(),
    }
    _write()
    print(json.dumps(RESULTS["step_forward_backward"], indent=2))


CURVE_LR = float(os.environ.get("YAPO_BENCH_CURVE_LR", "5e-3"))
CURVE_WARMUP = int(os.environ.get("YAPO_BENCH_CURVE_WARMUP", "10"))
CURVE_HOLDOUT = float(os.environ.get("YAPO_BENCH_CURVE_HOLDOUT", "0.2"))


def steps_to_reach(losses, target=0.3, window=5):
    """(first step whose loss <= target, first step whose trailing mean over `window` steps <= target)."""
    raw = next((i + 1 for i, x in enumerate(losses) if x <= target), None)
    mean = next(
        (
            i + 1
            for i in range(len(losses))
            if sum(losses[max(0, i - window + 1) : i + 1]) / min(window, i + 1) <= target
        ),
        None,
    )
    return raw, mean


def early_stopping_from_log(steps, evals, patience=2):
    """From a full run's per-step seconds and per-epoch held-out evaluations: the time to first reach
    the held-out accuracy of the full schedule, and where `patience` early stopping stops (a run with
    patience is the same run cut short: split, schedule and updates do not depend on patience)."""
    cum, t = {}, 0.0
    for r in steps:
        t += r["seconds"]
        cum[r["step"]] = t
    final = evals[-1]["heldout_accuracy"]
    first = next(e for e in evals if e["heldout_accuracy"] >= final)
    accs, stop = [], evals[-1]
    for e in evals:
        accs.append(e["heldout_accuracy"])
        if len(accs) - 1 - accs.index(max(accs)) >= patience:
            stop = e
            break
    return {
        "full_schedule": {
            "steps": evals[-1]["step"],
            "step_seconds": cum[evals[-1]["step"]],
            "heldout_accuracy": final,
        },
        "first_reaching_final_accuracy": {
            "epoch": first["epoch"] + 1,
            "steps": first["step"],
            "step_seconds": cum[first["step"]],
        },
        f"patience_{patience}": {
            "stops_after_epoch": stop["epoch"] + 1,
            "steps": stop["step"],
            "step_seconds": cum[stop["step"]],
            "heldout_accuracy": stop["heldout_accuracy"],
            "best_heldout_accuracy": max(accs),
        },
    }


def plot_curves(curves: dict, evals: dict, path, title: str):
    """Loss per step (thin) and its 5-step mean (thick) per method; held-out accuracy and loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"yapo": "tab:blue", "bipo": "tab:red"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for method, recs in curves.items():
        c = colors.get(method)
        steps, ls = [r["step"] for r in recs], [r["loss"] for r in recs]
        ax.plot(steps, ls, lw=0.7, alpha=0.45, color=c)
        ax.plot(
            steps,
            [sum(ls[max(0, i - 4) : i + 1]) / min(5, i + 1) for i in range(len(ls))],
            lw=1.8,
            color=c,
            label=f"{method} (5-step mean; thin: per step)",
        )
        ev = evals.get(method) or []
        ax2.plot(
            [e["step"] for e in ev],
            [e["heldout_loss"] for e in ev],
            marker="o",
            color=c,
            label=f"{method}: loss (accuracy " + ", ".join(f"{e['heldout_accuracy']:.2f}" for e in ev) + ")",
        )
    ax.axhline(0.3, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("bi-directional DPO loss (batch)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    ax2.set_xlabel("optimizer step (end of each epoch)")
    ax2.set_ylabel("held-out DPO loss at m=+1")
    ax2.set_title("held-out pairs", fontsize=8)
    ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def test_trainer_convergence_yapo_vs_bipo():
    """Loss curves of YaPO and BiPO on the same pairs and split (lean trainer), steps to reach loss
    0.3, held-out preference accuracy after every epoch (early stopping read off the same run)."""
    model, tok, sae, pairs = setup()
    curves, evals, out = {}, {}, {}
    kw = dict(
        model=model,
        tokenizer=tok,
        layer=sae.layer,
        epochs=CURVE_EPOCHS,
        batch_size=BATCH,
        lr=CURVE_LR,
        warmup_steps=CURVE_WARMUP,
        seed=0,
        progress=False,
        holdout=CURVE_HOLDOUT,
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for method in ("yapo", "bipo"):
        res = yapo_fast.train(method, pairs[:CURVE_PAIRS], sae=sae if method == "yapo" else None, **kw)
        curves[method], evals[method] = res.losses, res.evals
        with open(RESULTS_DIR / f"trainer_curves.{method}.partial.jsonl", "w") as f:  # survives a later kill
            f.writelines(json.dumps({"method": method, **r}) + "\n" for r in res.losses + res.evals)
        raw, mean = steps_to_reach([r["loss"] for r in res.losses])
        out[method] = {
            "steps_to_0.3": raw,
            "steps_to_0.3_(5-step mean)": mean,
            "lowest_loss": min(r["loss"] for r in res.losses),
            "final_5_step_mean": sum(r["loss"] for r in res.losses[-5:]) / 5,
            "steps": len(res.losses),
            "cache_seconds": res.cache_seconds,
            "step_seconds": sum(r["seconds"] for r in res.losses),
            "heldout_accuracy_per_epoch": [e["heldout_accuracy"] for e in res.evals],
            "early_stopping": early_stopping_from_log(res.losses, res.evals) if res.evals else None,
        }
    with open(RESULTS_DIR / "trainer_curves.jsonl", "w") as f:
        for method in curves:
            f.writelines(json.dumps({"method": method, **r}) + "\n" for r in curves[method] + evals[method])

    plot_curves(
        curves,
        evals,
        RESULTS_DIR / "trainer_curves.png",
        f"BiPO hallucination, {len(curves['yapo']) // CURVE_EPOCHS * BATCH} train pairs, batch {BATCH}, "
        f"lr {CURVE_LR:g}, warm-up {CURVE_WARMUP}, cosine",
    )
    out["settings"] = {
        "lr": CURVE_LR,
        "warmup_steps": CURVE_WARMUP,
        "epochs": CURVE_EPOCHS,
        "pairs": CURVE_PAIRS,
        "holdout": CURVE_HOLDOUT,
        "batch_size": BATCH,
        "seed": 0,
        "sae": sae.name,
        "sae_weights_hash": sae.weights_hash(),
        "torch_threads": torch.get_num_threads(),
    }
    RESULTS["convergence"] = out
    _write()
    print(json.dumps(RESULTS["convergence"], indent=2))


def test_trainer_flop_bound_blend():
    """The FLOP ratio on cultural (BLEnD) sets: the shipped preference pairs (question -> answer) and
    a multiple-choice form (question + 4 options -> the correct letter vs a wrong one), whose long
    prompts and one-token answers gain most from prompt sharing."""
    model, tok, sae, halluc = setup()
    country = "UK"
    sets = blend_sets(country)
    RESULTS["blend_flops"] = {}
    from yapo_fast.train import batch_schedule

    l0 = _mean_l0(model, tok, sae, halluc)
    for name, pairs in sets.items():
        toks = tokenize_pairs(tok, pairs)
        lengths = [(len(t.prompt), len(t.chosen), len(t.rejected)) for t in toks]
        batches = [[lengths[i] for i in b] for _, b, _ in batch_schedule(len(lengths), BATCH, 1, 0)]
        f = flops(model, sae, lengths, sae.layer, l0, batches)
        RESULTS["blend_flops"][name] = {
            "country": country,
            "pairs": len(pairs),
            "mean_tokens": [sum(x[i] for x in lengths) / len(lengths) for i in range(3)],
            "sae_mean_l0": l0,
            **{k: v for k, v in f.items() if k.startswith("ratio")},
        }
    _write()
    print(json.dumps(RESULTS["blend_flops"], indent=2))


def _slim(v):
    return {kk: vv for kk, vv in v.items() if "losses" not in kk} if isinstance(v, dict) else v


_LOADED = {k: json.dumps(_slim(v), default=str) for k, v in RESULTS.items()}


def _write():
    """Merge this process's new results into trainer.json (other bench processes may have written
    other keys since this one started)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "trainer.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    for k, v in RESULTS.items():
        if json.dumps(_slim(v), default=str) != _LOADED.get(k):
            current[k] = _slim(v)
    current.pop("profile_top", None)  # superseded by "profile"
    from yapo_fast.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(current, indent=2, default=str))
