"""Benchmarks of the lean trainer (yapo_fast.train) against the naive one (tests/naive_trainer.py),
measured in the same run on the default model (SmolLM2-135M-Instruct, CPU, float32) and the
shipped SAE (a calibrated random JumpReLU SAE at layer 15 when none is shipped).

    YAPO_BENCH_THREADS=1 .venv/bin/pytest bench/bench_trainer.py -s -p no:cacheprovider -k "paired or ratio or blend"
    YAPO_BENCH_THREADS=1 .venv/bin/pytest bench/bench_trainer.py -s -p no:cacheprovider -k "profile or convergence"
    (the end-to-end runs: -k "lean or naive"; slow on a loaded machine)

The primary measurement is test_trainer_epoch_paired: one epoch of both trainers, step by step in
turn, so that both see the same machine load (on the shared 2-core machine the load swings by 3x
within minutes, which makes back-to-back end-to-end timings meaningless). Knobs: YAPO_BENCH_PAIRS
(BiPO hallucination pairs timed, default 20: one naive epoch of 200 pairs takes far longer than the
10-minute budget here; per-200-pair figures are scaled), YAPO_BENCH_LAYER (layer of the random SAE
when none is shipped; 15), YAPO_BENCH_CURVE_PAIRS / _EPOCHS (loss curves; 12 pairs, 5 epochs),
YAPO_BENCH_THREADS (torch threads; default: torch's).

Results: bench/results/trainer.json (timings, ratios, FLOP bound, peak memory, profile summary),
bench/results/trainer_profile.txt, bench/results/trainer_curves.jsonl and .png.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from naive_trainer import NaiveTrainer  # noqa: E402

import yapo_fast  # noqa: E402
from yapo_fast.data import bipo_csv_path, load_pairs  # noqa: E402
from yapo_fast.train.cache import tokenize_pairs  # noqa: E402

N_PAIRS = int(os.environ.get("YAPO_BENCH_PAIRS", "20"))
RANDOM_SAE_LAYER = int(os.environ.get("YAPO_BENCH_LAYER", "15"))
CURVE_EPOCHS = int(os.environ.get("YAPO_BENCH_CURVE_EPOCHS", "5"))
CURVE_PAIRS = int(os.environ.get("YAPO_BENCH_CURVE_PAIRS", "12"))
BATCH = 4
RESULTS_DIR = Path(__file__).parent / "results"
# Results of earlier runs (other -k selections) are kept and updated, not thrown away.
RESULTS: dict = json.loads((RESULTS_DIR / "trainer.json").read_text()) if (RESULTS_DIR / "trainer.json").exists() else {}
if os.environ.get("YAPO_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["YAPO_BENCH_THREADS"]))


def calibrated_random_sae(model, tok, pairs, layer: int, l0: float = 64.0):
    """SAE.random (d_in 576, d_sae 4608, JumpReLU) with per-latent thresholds set so that each latent
    fires on a fraction l0/d_sae of real layer-L tokens (the shipped SAE's target L0 of 64); the
    raw random thresholds would leave ~2000 latents active per token on real residual norms."""
    from yapo_fast.integrations.hf_hooks import capture_layer_output

    sae = yapo_fast.SAE.random("jumprelu", model.config.hidden_size, 8 * model.config.hidden_size, layer=layer,
                               name="random-jumprelu-calibrated")
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
    RESULTS["setup"] = {"model": yapo_fast.DEFAULT_MODEL, "sae": sae.name, "sae_origin": origin, "sae_kind": sae.kind,
                        "d_sae": sae.d_sae, "layer": sae.layer, "pairs_timed": N_PAIRS, "batch_size": BATCH,
                        "torch_threads": torch.get_num_threads(), "load_avg_at_start": os.getloadavg()}
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
def flops(model, sae, token_lengths, layer, l0: float) -> dict:
    """Multiply-adds x2 of one epoch, per trainer, from the real token lengths (no padding: the
    bound exact savings can reach). Linear layers and attention (QK and AV over the keys a token
    sees); backward wrt activations only (no weight gradients) costs as much as the forward."""
    cfg = model.config
    d, ff, V, N = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    lin = d * q + 2 * d * kv + q * d + 3 * d * ff  # per token per layer

    def layers(n_layers, n_tokens, keys):  # keys: total keys seen by these tokens
        return n_layers * (lin * n_tokens + 2 * q * keys)

    a = N - 1 - layer  # layers after L
    naive = lean_cache = lean_steps = 0
    for P, Rc, Rr in token_lengths:
        for R in (Rc, Rr):  # naive: two full sequences prompt+response
            T = P + R
            keys = T * (T + 1) // 2
            fwd = layers(N, T, keys) + V * d * T + 3 * d * sae.d_sae * T  # + SAE encode, 2 decodes
            bwd = layers(a, T, 2 * keys) + V * d * T + d * sae.d_sae * T
            ref = layers(N, T, keys) + V * d * T
            naive += fwd + bwd + ref
        keys = P * (P + 1) // 2 + sum(R * P + R * (R + 1) // 2 for R in (Rc, Rr))
        T = P + Rc + Rr
        resp = Rc + Rr  # LM head only where a response token is predicted
        lean_cache += layers(N, T, keys) + V * d * resp + d * sae.d_sae * T
        lean_steps += 2 * (layers(a, T, 1.5 * keys) + V * d * resp + l0 * d * T)
    return {"naive": 2 * naive, "lean_cache": 2 * lean_cache, "lean_steps": 2 * lean_steps,
            "lean": 2 * (lean_cache + lean_steps), "ratio_1_epoch": naive / (lean_cache + lean_steps),
            "ratio_2_epochs": 2 * naive / (lean_cache + 2 * lean_steps),
            "ratio_steps_only": naive / lean_steps}


# ---- the timed runs ----------------------------------------------------------------------------
TRAIN_KW = dict(epochs=1, batch_size=BATCH, lr=5e-4, warmup_steps=100, seed=0)


def run_naive():
    model, tok, sae, pairs = setup()
    naive = NaiveTrainer("yapo", model, tok, pairs[:N_PAIRS], sae.layer, sae=sae)
    return naive.train(**TRAIN_KW)


def run_lean():
    model, tok, sae, pairs = setup()
    return yapo_fast.train("yapo", pairs[:N_PAIRS], model=model, tokenizer=tok, sae=sae, layer=sae.layer,
                           progress=False, **TRAIN_KW)


def run_paired():
    """One epoch of both trainers, step by step in turn (naive step k, then the lean trainer's
    cache of batch k's pairs and its step k), so that both see the same machine load: on a shared
    machine whose load swings, this is the fair ratio. Same schedule, optimizer and data."""
    from yapo_fast.train import TrainConfig, batch_schedule, make_optimizer
    from yapo_fast.train.cache import ExampleCache, build_cache
    from yapo_fast.train.lean import DecoderRunner
    from yapo_fast.train.trainer import LeanObjective

    model, tok, sae, pairs = setup()
    pairs = pairs[:N_PAIRS]
    cfg = TrainConfig(method="yapo", layer=sae.layer, **TRAIN_KW)
    schedule = batch_schedule(len(pairs), BATCH, 1, 0)
    naive = NaiveTrainer("yapo", model, tok, pairs, sae.layer, sae=sae)
    runner = DecoderRunner(model)
    toks = tokenize_pairs(tok, pairs)
    cache = ExampleCache()
    lean = LeanObjective(runner, cache, cfg, sae)
    out = {"naive": 0.0, "lean": 0.0, "lean_cache": 0.0, "naive_losses": [], "lean_losses": []}
    state = {}
    for name in ("naive", "lean"):
        v = torch.zeros(sae.d_sae, requires_grad=True)
        state[name] = (v, *make_optimizer(v, cfg, len(schedule)))
    for _, batch, d in schedule:
        for name in ("naive", "lean"):
            v, opt, sched = state[name]
            t0 = time.perf_counter()
            if name == "lean":
                part = build_cache(runner, toks, batch, sae.layer, sae=sae, batch_size=BATCH, progress=False)
                cache.entries.update(part.entries)
                out["lean_cache"] += time.perf_counter() - t0
                loss = lean.loss_sum(batch, v, d) / len(batch)
            else:
                loss = naive.loss(batch, v, d)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([v], cfg.grad_clip)
            opt.step()
            sched.step()
            out[name] += time.perf_counter() - t0
            out[f"{name}_losses"].append(float(loss.detach()))
    return out


def test_trainer_epoch_paired(benchmark):
    setup()
    out = benchmark.pedantic(run_paired, rounds=1, iterations=1)
    RESULTS["paired"] = {**out, "speedup": out["naive"] / out["lean"],
                         "speedup_steps_only": out["naive"] / (out["lean"] - out["lean_cache"]),
                         "final_loss_abs_diff": abs(out["naive_losses"][-1] - out["lean_losses"][-1]),
                         "load_avg_after": os.getloadavg()}
    _write()
    print(json.dumps({k: v for k, v in RESULTS["paired"].items() if "losses" not in k}, indent=2))
    assert RESULTS["paired"]["final_loss_abs_diff"] <= 1e-4


def test_trainer_epoch_lean(benchmark):
    setup()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        res = benchmark.pedantic(run_lean, rounds=1, iterations=1)
        seconds = time.perf_counter() - t0
    RESULTS["lean"] = {"seconds": seconds, "cache_seconds": res.cache_seconds,
                       "step_seconds": sum(r["seconds"] for r in res.losses), "steps": res.steps,
                       "peak_rss_mib": mem.mib, "final_loss": res.losses[-1]["loss"],
                       "losses": [r["loss"] for r in res.losses], "nnz_v": res.losses[-1]["nnz"]}


def test_trainer_epoch_naive(benchmark):
    setup()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        v, records = benchmark.pedantic(run_naive, rounds=1, iterations=1)
        seconds = time.perf_counter() - t0
    RESULTS["naive"] = {"seconds": seconds, "steps": len(records), "peak_rss_mib": mem.mib,
                        "final_loss": records[-1]["loss"], "losses": [r["loss"] for r in records]}


def test_trainer_ratio_and_flop_bound():
    """The measured ratio (interleaved run, and the end-to-end runs when they ran) against the
    FLOP bound, and exactness (same final loss)."""
    model, tok, sae, pairs = setup()
    paired = RESULTS["paired"]
    lean, naive = RESULTS.get("lean"), RESULTS.get("naive")
    toks = tokenize_pairs(tok, pairs[:N_PAIRS])
    lengths = [(len(t.prompt), len(t.chosen), len(t.rejected)) for t in toks]
    l0 = _mean_l0(model, tok, sae, pairs)
    f = flops(model, sae, lengths, sae.layer, l0)
    per_200 = lambda s: s / N_PAIRS * 200  # noqa: E731  (seconds per epoch of 200 pairs, scaled)
    RESULTS["ratio"] = {
        "measured_speedup_1_epoch_paired": paired["speedup"],
        "measured_speedup_steps_only_paired": paired["speedup_steps_only"],
        "flop_bound_1_epoch": f["ratio_1_epoch"], "flop_bound_2_epochs": f["ratio_2_epochs"],
        "flop_bound_steps_only": f["ratio_steps_only"],
        "naive_seconds_per_200_pair_epoch": per_200(paired["naive"]),
        "lean_seconds_per_200_pair_epoch": per_200(paired["lean"]),
        "final_loss_abs_diff": paired["final_loss_abs_diff"],
        "sae_mean_l0": l0, "gflops": {k: v / 1e9 for k, v in f.items() if not k.startswith("ratio")},
        "mean_tokens": {"prompt": sum(x[0] for x in lengths) / len(lengths),
                        "chosen": sum(x[1] for x in lengths) / len(lengths),
                        "rejected": sum(x[2] for x in lengths) / len(lengths)},
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
    """Where the lean trainer's time goes: torch profiler over a few steps (self CPU time by op)."""
    from torch.profiler import ProfilerActivity, profile

    model, tok, sae, pairs = setup()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yapo_fast.train("yapo", pairs[:8], model=model, tokenizer=tok, sae=sae, layer=sae.layer, progress=False,
                        epochs=1, batch_size=BATCH)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "trainer_profile.txt").write_text(table)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    RESULTS["profile_top"] = [{"op": e.key, "self_cpu_share": e.self_cpu_time_total / total}
                              for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]]
    _write()
    print(table)


def test_trainer_convergence_yapo_vs_bipo():
    """Loss curves of YaPO and BiPO on the same pairs (lean trainer), steps to reach loss 0.3."""
    model, tok, sae, pairs = setup()
    curves = {}
    kw = dict(model=model, tokenizer=tok, layer=sae.layer, epochs=CURVE_EPOCHS, batch_size=BATCH, lr=5e-3,
              warmup_steps=5, seed=0, progress=False)
    for method in ("yapo", "bipo"):
        res = yapo_fast.train(method, pairs[:CURVE_PAIRS], sae=sae if method == "yapo" else None, **kw)
        curves[method] = [r["loss"] for r in res.losses]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_DIR / "trainer_curves.jsonl", "w") as f:
        for method, losses in curves.items():
            for step, loss in enumerate(losses, 1):
                f.write(json.dumps({"method": method, "step": step, "loss": loss}) + "\n")

    def reach(losses, target=0.3, window=5):  # first step whose trailing mean (5 steps) is <= target
        for i in range(len(losses)):
            if sum(losses[max(0, i - window + 1): i + 1]) / min(window, i + 1) <= target:
                return i + 1
        return None

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for method, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=method)
    ax.axhline(0.3, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("bi-directional DPO loss")
    ax.set_title(f"{CURVE_PAIRS} BiPO hallucination pairs, lr 5e-3, batch {BATCH}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "trainer_curves.png", dpi=120)
    RESULTS["convergence"] = {m: {"steps_to_0.3_(5-step mean)": reach(c), "final_loss": c[-1], "steps": len(c)}
                              for m, c in curves.items()}
    RESULTS["convergence"]["settings"] = {"lr": 5e-3, "warmup_steps": 5, "epochs": CURVE_EPOCHS, "pairs": CURVE_PAIRS}
    _write()
    print(json.dumps(RESULTS["convergence"], indent=2))


def test_trainer_flop_bound_blend():
    """The FLOP ratio on cultural (BLEnD) sets: the shipped preference pairs (question -> answer) and
    a multiple-choice form (question + 4 options -> the correct letter vs a wrong one), whose long
    prompts and one-token answers gain most from prompt sharing."""
    from yapo_fast import blend
    from yapo_fast.data import PreferencePair

    model, tok, sae, _ = setup()
    country = "UK"
    sets = {"pairs": blend.preference_pairs(country, "localized")[:200]}
    mc = []
    for item in blend.mcq_items(country, "localized", split="train")[:200]:
        prompt = item.question + "\n" + "\n".join(f"{L}. {o}" for L, o in zip("ABCD", item.options)) + \
            "\nAnswer with the letter of the correct option."
        wrong = next(L for L in "ABCD" if L != item.answer)
        mc.append(PreferencePair(prompt, item.answer, wrong))
    sets["multiple_choice"] = mc
    RESULTS["blend_flops"] = {}
    for name, pairs in sets.items():
        toks = tokenize_pairs(tok, pairs)
        lengths = [(len(t.prompt), len(t.chosen), len(t.rejected)) for t in toks]
        f = flops(model, sae, lengths, sae.layer, 64.0)
        RESULTS["blend_flops"][name] = {"country": country, "pairs": len(pairs),
                                        "mean_tokens": [sum(x[i] for x in lengths) / len(lengths) for i in range(3)],
                                        **{k: v for k, v in f.items() if k.startswith("ratio")}}
    _write()
    print(json.dumps(RESULTS["blend_flops"], indent=2))


def _write():
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    slim = {k: ({kk: vv for kk, vv in v.items() if "losses" not in kk} if isinstance(v, dict) else v)
            for k, v in RESULTS.items()}
    (RESULTS_DIR / "trainer.json").write_text(json.dumps(slim, indent=2, default=str))
