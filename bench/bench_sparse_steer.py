"""Fused sparse steer vs THE reference formula and vs the work it cannot avoid, same run.

Headline (the issue's target): CPU, d_model 576, d_sae 9216, T 512, support 64 with half the
entries negative, JumpReLU. Floor = the unavoidable work as plain torch matmuls: h @ enc_cols
of the negative entries and coef @ dec_rows of the negative entries.
Sweep: T 1..4096 x support 16..4096, JumpReLU and TopK (the reference only where it takes < ~2 s).

Run: bash scripts/bench.sh bench/bench_sparse_steer.py   (see bench/README.md)
"""

import functools
import time

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
SWEEP = [(kind, T, s, path) for kind in ("jumprelu", "topk") for T in (1, 64, 512, 4096) for s in (16, 256, 4096)
         for path in ("reference", "fused", "unavoidable_matmuls") if not (path == "reference" and T > 512)]


@pytest.mark.parametrize("kind,T,support,path", SWEEP)
def test_sweep(benchmark, record, kind, T, support, path):
    sae, h, v, prepared = setup(kind, T, support)
    benchmark.group = f"sweep {kind} T={T} support={support}"
    fn = {"reference": lambda: sparse_steer_reference(h, sae, v, 1.0),
          "fused": lambda: sparse_steer(h, prepared),
          "unavoidable_matmuls": floor_fn(h, prepared)}[path]
    t0 = time.perf_counter()
    fn()
    benchmark.pedantic(fn, rounds=rounds_for(time.perf_counter() - t0), iterations=1, warmup_rounds=1)
    record(MODULE, benchmark.group, path, benchmark)
