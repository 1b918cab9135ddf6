"""Fused sparse steer vs THE reference formula and vs the work it cannot avoid, same run.

Headline (the issue's target): CPU, d_model 576, d_sae 9216, T 512, support 64 with half the
entries negative, JumpReLU. Floor = the unavoidable work as plain torch matmuls: h @ enc_cols
of the negative entries and coef @ dec_rows of the negative entries.
Sweep: T 1..4096 x support 16..4096, JumpReLU and TopK (the reference only where it takes < ~2 s).
Decode: T 1..8 (serving one token per request), the CPU default vs each backend forced: this is
what the CPU dispatch rule (kernels/sparse_steer_backend.py) is read from.
GPU (test_gpu_*, deselected with the reason printed where there is no CUDA): d_model 2304, d_sae 65536, T 1..8192, fused
Triton (default and each variant) vs torch eager and torch.compile of the reference, and as a
fraction of the memory-bandwidth bound; table in bench/results/bench_sparse_steer_gpu.md.

Run: bash scripts/bench.sh bench/bench_sparse_steer.py   (see bench/README.md)
"""

import functools
import math
import time
from pathlib import Path

import pytest
import torch
from helpers import random_latent, random_sae

from yapo_fast.kernels.sparse_steer import prepare_sparse_steer, sparse_steer
from yapo_fast.kernels.sparse_steer_reference import sparse_steer_reference

D_MODEL, D_SAE = 576, 9216
pytestmark = pytest.mark.usefixtures("bench_threads")
MODULE = "bench_sparse_steer"


@functools.lru_cache(maxsize=None)
def sae_of(kind):
    return random_sae(kind, d_in=D_MODEL, d_sae=D_SAE, seed=0, k=64 if kind == "topk" else None)


def setup(kind, T, support):
    sae = sae_of(kind)
    h = 2.0 * torch.randn(T, D_MODEL, generator=torch.Generator().manual_seed(T))
    v = random_latent(D_SAE, support, "mixed", seed=support)  # alternating signs: half negative
    prepared = prepare_sparse_steer(sae, v, 1.0)
    return sae, h, v, prepared


def floor_fn(h, prepared):
    """The unavoidable work as plain matmuls: encode the negative entries, decode their
    coefficients; for TopK also the full encoder product (the k-th largest needs every latent)."""
    coef = torch.randn(h.shape[0], prepared.n_dependent)

    def run():
        torch.mm(h, prepared.enc_cols)
        torch.mm(coef, prepared.dec_rows)
        if prepared.kind == "topk":
            torch.mm(h, prepared.topk_W_enc)

    return run


def rounds_for(seconds_estimate):
    return max(3, min(50, int(2.0 / max(seconds_estimate, 1e-6))))


@pytest.mark.parametrize("path", ["reference", "fused", "fused_torch", "fused_numba", "unavoidable_matmuls"])
def test_headline_jumprelu_T512_support64(benchmark, record, path):
    sae, h, v, prepared = setup("jumprelu", 512, 64)
    benchmark.group = "headline jumprelu T=512 support=64 (32 negative)"
    fns = {
        "reference": lambda: sparse_steer_reference(h, sae, v, 1.0),
        "fused": lambda: sparse_steer(h, prepared),
        "fused_torch": lambda: sparse_steer(h, prepared, backend="torch"),
        "fused_numba": lambda: sparse_steer(h, prepared, backend="numba"),
        "unavoidable_matmuls": floor_fn(h, prepared),
    }
    fn = fns[path]
    fn()  # warm-up (numba compile / cache load, allocator)
    benchmark.pedantic(fn, rounds=5 if path == "reference" else 50, iterations=1, warmup_rounds=2)
    record(MODULE, benchmark.group, path, benchmark)


# The reference only up to T=512: beyond, it takes seconds per call (three full d_sae products).
SWEEP = [
    (kind, T, s, path)
    for kind in ("jumprelu", "topk")
    for T in (1, 64, 512, 4096)
    for s in (16, 256, 4096)
    for path in ("reference", "fused", "unavoidable_matmuls")
    if not (path == "reference" and T > 512)
]


@pytest.mark.parametrize("kind,T,support,path", SWEEP)
def test_sweep(benchmark, record, kind, T, support, path):
    sae, h, v, prepared = setup(kind, T, support)
    benchmark.group = f"sweep {kind} T={T} support={support}"
    fn = {
        "reference": lambda: sparse_steer_reference(h, sae, v, 1.0),
        "fused": lambda: sparse_steer(h, prepared),
        "unavoidable_matmuls": floor_fn(h, prepared),
    }[path]
    t0 = time.perf_counter()
    fn()
    benchmark.pedantic(fn, rounds=rounds_for(time.perf_counter() - t0), iterations=1, warmup_rounds=1)
    record(MODULE, benchmark.group, path, benchmark)


# Decode shapes: one token per request (T 1..8); default backend vs each CPU backend forced.
DECODE = [
    (T, s, path)
    for T in (1, 2, 4, 8)
    for s in (16, 64, 256, 4096)
    for path in ("fused", "fused_torch", "fused_numba", "unavoidable_matmuls")
]


@pytest.mark.parametrize("T,support,path", DECODE)
def test_decode(benchmark, record, T, support, path):
    sae, h, v, prepared = setup("jumprelu", T, support)
    benchmark.group = f"decode jumprelu T={T} support={support}"
    fn = {
        "fused": lambda: sparse_steer(h, prepared),
        "fused_torch": lambda: sparse_steer(h, prepared, backend="torch"),
        "fused_numba": lambda: sparse_steer(h, prepared, backend="numba"),
        "unavoidable_matmuls": floor_fn(h, prepared),
    }[path]
    fn()
    benchmark.pedantic(fn, rounds=200 if support <= 256 else 30, iterations=1, warmup_rounds=5)
    record(MODULE, benchmark.group, path, benchmark)


def test_decode_interleaved_crossover(bench_threads):
    """The CPU dispatch rule's source: torch path vs numba kernel at decode shapes, timed
    INTERLEAVED (torch, numba, torch, ...) in one loop, as in a model's forward where the steer
    sits between torch ops (each path alone looks better for numba: caches stay warm). Writes
    bench/results/bench_sparse_steer_decode_interleaved.md (us, median [min])."""
    lines = [
        "# decode crossover, torch path vs numba kernel, interleaved (us, median [min]; "
        f"threads={bench_threads}; jumprelu, d_model {D_MODEL}, d_sae {D_SAE}, n = support/2)",
        "",
        "| support | n | T | torch | numba | numba / torch | default |",
        "|---|---|---|---|---|---|---|",
    ]
    from yapo_fast.kernels.sparse_steer_backend import default_cpu_backend

    for support in (16, 64, 256, 1024, 4096):
        for T in (1, 2, 4, 8, 16):
            if support == 4096 and T > 8:
                continue
            _, h, _, prepared = setup("jumprelu", T, support)
            fns = {b: (lambda b=b: sparse_steer(h, prepared, backend=b)) for b in ("torch", "numba")}
            times = {b: [] for b in fns}
            for f in fns.values():
                for _ in range(5):
                    f()
            for _ in range(200 if support <= 256 else 40):
                for b, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    times[b].append(time.perf_counter() - t0)
            med = {b: sorted(v)[len(v) // 2] * 1e6 for b, v in times.items()}
            low = {b: min(v) * 1e6 for b, v in times.items()}
            lines.append(
                f"| {support} | {prepared.n_dependent} | {T} | {med['torch']:.1f} [{low['torch']:.1f}] | "
                f"{med['numba']:.1f} [{low['numba']:.1f}] | {med['numba'] / med['torch']:.2f} "
                f"[{low['numba'] / low['torch']:.2f}] | "
                f"{default_cpu_backend('sparse_steer', (T, D_MODEL, prepared.n_dependent))} |"
            )
    out = Path(__file__).parent / "results" / "bench_sparse_steer_decode_interleaved.md"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print("\n".join(lines))


# ---- GPU (when one is lent) ---------------------------------------------------------------------
GPU_D_MODEL, GPU_D_SAE, GPU_SUPPORT, GPU_K = 2304, 65536, 64, 64
GPU_T = (1, 8, 64, 256, 1024, 8192)
GPU_PATHS = ("reference", "reference_compiled", "fused", "fused_rows", "fused_tiles")
GPU_RESULTS = {}  # (kind, T) -> {path: seconds per call (median of rounds)}
GPU_RESULTS_FILE = Path(__file__).parent / "results" / "bench_sparse_steer_gpu.md"


@functools.lru_cache(maxsize=None)
def gpu_sae(kind):
    return random_sae(kind, d_in=GPU_D_MODEL, d_sae=GPU_D_SAE, seed=0, k=GPU_K if kind == "topk" else None).to("cuda")


@functools.lru_cache(maxsize=None)
def compiled_reference():
    return torch.compile(sparse_steer_reference, dynamic=True)


@functools.lru_cache(maxsize=None)
def copy_bandwidth():
    """Bytes per second of a 1 GiB device-to-device copy (read + write), best of 10, measured in
    this run: the memory-bandwidth bound is expressed against what this GPU really does."""
    x = torch.empty(1 << 28, device="cuda")
    y = torch.empty_like(x)
    best = math.inf
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        if i >= 3:
            best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * x.numel() * x.element_size() / best


def bytes_touched(prepared, h):
    """What any exact implementation must move: h read and h' written, the support's gathered
    encoder columns, decoder rows, bias/threshold/coefficient and the constant; for TopK also the
    whole encoder (the k-th largest pre-activation needs every latent)."""
    total = 2 * h.numel() * h.element_size()
    for t in (
        prepared.enc_cols,
        prepared.dec_rows,
        prepared.const,
        prepared.enc_bias,
        prepared.thresholds,
        prepared.coef,
    ):
        total += t.numel() * t.element_size()
    if prepared.kind == "topk":
        total += sum(t.numel() * t.element_size() for t in (prepared.topk_W_enc, prepared.topk_b_enc))
    return total


def write_gpu_table():
    bandwidth = copy_bandwidth()
    lines = [
        f"# bench_sparse_steer GPU ({torch.cuda.get_device_name()}; d_model {GPU_D_MODEL}, d_sae {GPU_D_SAE}, "
        f"support {GPU_SUPPORT} (half negative), h bfloat16)",
        "",
        f"Copy bandwidth measured in this run: {bandwidth / 1e9:.0f} GB/s. bound = bytes touched / that.",
        "",
        "| kind | T | " + " | ".join(f"{p} ms" for p in GPU_PATHS) + " | bound ms | fused vs eager | fused vs compiled "
        "| bound / fused |",
        "|" + "---|" * (len(GPU_PATHS) + 6),
    ]
    for (kind, T), times in sorted(GPU_RESULTS.items()):
        cells = [f"{times[p] * 1e3:.4f}" if p in times else "-" for p in GPU_PATHS]
        fused, bound = times.get("fused"), times.get("bound")

        def ratio(base, times=times, fused=fused):
            return f"{times[base] / fused:.1f}x" if fused and base in times else "-"

        frac = f"{bound / fused:.2f}" if fused and bound else "-"
        lines.append(
            f"| {kind} | {T} | " + " | ".join(cells) + f" | {bound * 1e3:.4f} | {ratio('reference')} | "
            f"{ratio('reference_compiled')} | {frac} |"
        )
    GPU_RESULTS_FILE.parent.mkdir(exist_ok=True)
    tmp = GPU_RESULTS_FILE.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(GPU_RESULTS_FILE)


@pytest.mark.gpu  # deselected where there is no CUDA GPU (tests/machine_marks.py)
@pytest.mark.parametrize("kind", ("jumprelu", "topk"))
@pytest.mark.parametrize("T", GPU_T)
@pytest.mark.parametrize("path", GPU_PATHS)
def test_gpu(benchmark, kind, T, path):
    from yapo_fast.kernels.sparse_steer import _per_slot, _topk_cut
    from yapo_fast.kernels.sparse_steer_triton import ROWS_MAX_N, steer_triton

    sae = gpu_sae(kind)
    h = (2.0 * torch.randn(T, GPU_D_MODEL, generator=torch.Generator().manual_seed(T))).to("cuda", torch.bfloat16)
    v = random_latent(GPU_D_SAE, GPU_SUPPORT, "mixed", seed=GPU_SUPPORT).cuda()
    prepared = prepare_sparse_steer(sae, v, 1.0)
    if path in ("fused_rows", "fused_tiles"):
        variant = path.removeprefix("fused_")
        if variant == "rows" and prepared.n_dependent > ROWS_MAX_N:
            pytest.skip(f"the rows variant holds at most {ROWS_MAX_N} dependent entries")
        out = torch.empty_like(h)
        tensors = _per_slot(prepared)

        def fn():
            steer_triton(h, out, None, *tensors, _topk_cut(h, prepared, "triton"), variant=variant)
    else:
        fn = {
            "reference": lambda: sparse_steer_reference(h, sae, v, 1.0),
            "reference_compiled": lambda: compiled_reference()(h, sae, v, 1.0),
            "fused": lambda: sparse_steer(h, prepared),
        }[path]
    fn()  # compile / autotune / allocator warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    reps = max(1, min(1000, int(2e-3 / max(time.perf_counter() - t0, 1e-6))))  # >= ~2 ms per round

    def rounds():
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()

    benchmark.group = f"gpu {kind} T={T}"
    benchmark.extra_info["calls_per_round"] = reps
    benchmark.pedantic(rounds, rounds=10, iterations=1, warmup_rounds=1)
    times = GPU_RESULTS.setdefault((kind, T), {})
    times[path] = benchmark.stats.stats.median / reps
    times["bound"] = bytes_touched(prepared, h) / copy_bandwidth()
    write_gpu_table()
