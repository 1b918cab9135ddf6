"""TopK threshold (k-th largest pre-activation per token over all d_sae latents, never holding
the (T, d_sae) matrix) vs torch matmul + topk (which does hold it), same run.
CPU, d_model 576, d_sae 9216, k 64. numba only up to T=512 (it is several x slower than MKL).
GPU (test_gpu_*, deselected with the reason printed where there is no CUDA): d_model 2304, d_sae 65536, k 64, T 1..8192,
the fused Triton kernel vs torch matmul + topk (the issue's aim: faster than that).

Run: bash scripts/bench.sh bench/bench_topk_threshold.py   (see bench/README.md)
"""

import pytest
import torch
from helpers import random_latent, random_sae

from yapo_fast.kernels.sparse_steer import prepare_sparse_steer
from yapo_fast.kernels.topk_threshold import topk_threshold

D_MODEL, D_SAE, K = 576, 9216, 64
pytestmark = pytest.mark.usefixtures("bench_threads")
MODULE = "bench_topk_threshold"
_P = {}


def prepared():
    if not _P:
        sae = random_sae("topk", d_in=D_MODEL, d_sae=D_SAE, k=K, seed=0)
        _P["p"] = prepare_sparse_steer(sae, random_latent(D_SAE, 1, "neg"), 1.0)
    return _P["p"]


CASES = [
    (T, path)
    for T in (1, 64, 512, 4096)
    for path in ("torch_matmul_topk", "fused", "fused_numba")
    if not (path == "fused_numba" and T > 512)
]


@pytest.mark.parametrize("T,path", CASES)
def test_topk_threshold(benchmark, record, T, path):
    p = prepared()
    x = 2.0 * torch.randn(T, D_MODEL, generator=torch.Generator().manual_seed(T))
    W, b = p.topk_W_enc, p.topk_b_enc
    fn = {
        "torch_matmul_topk": lambda: torch.topk(torch.addmm(b, x, W), K + 1, dim=1),
        "fused": lambda: topk_threshold(x, W, b, K),
        "fused_numba": lambda: topk_threshold(x, W, b, K, backend="numba"),
    }[path]
    fn()  # warm-up (numba compile / cache load)
    benchmark.group = f"topk threshold T={T} k={K}"
    benchmark.pedantic(fn, rounds=3 if T >= 512 else 10, iterations=1, warmup_rounds=1)
    record(MODULE, benchmark.group, path, benchmark)


_GPU = {}


def gpu_prepared():
    if not _GPU:
        sae = random_sae("topk", d_in=2304, d_sae=65536, k=K, seed=0).to("cuda")
        _GPU["p"] = prepare_sparse_steer(sae, random_latent(65536, 1, "neg").cuda(), 1.0)
    return _GPU["p"]


@pytest.mark.gpu  # deselected where there is no CUDA GPU (tests/machine_marks.py)
@pytest.mark.parametrize("T", (1, 8, 64, 256, 1024, 8192))
@pytest.mark.parametrize("path", ("torch_matmul_topk", "fused"))
def test_gpu_topk_threshold(benchmark, record, T, path):
    p = gpu_prepared()
    x = (2.0 * torch.randn(T, 2304, generator=torch.Generator().manual_seed(T))).cuda()
    W, b = p.topk_W_enc, p.topk_b_enc
    fn = {
        "torch_matmul_topk": lambda: torch.topk(torch.addmm(b, x, W), K + 1, dim=1),
        "fused": lambda: topk_threshold(x, W, b, K),
    }[path]
    fn()  # compile / warm-up
    torch.cuda.synchronize()
    reps = 20 if T <= 256 else 3

    def rounds():
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()

    benchmark.group = f"gpu topk threshold T={T} k={K} (x{reps} calls per round)"
    benchmark.pedantic(rounds, rounds=10, iterations=1, warmup_rounds=1)
    record(MODULE, benchmark.group, path, benchmark)
