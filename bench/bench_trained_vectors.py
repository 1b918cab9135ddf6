"""The YaPO op on TRAINED vectors (bench/artifacts/vectors/: the main job's dense YaPO vector and the
sparse ones of scripts/sparsity_scan.py), on real layer-15 states of the default model, at a decode
shape (T=4) and a prefill shape (T=64), against, in the same run:

- the two unavoidable matmuls of that vector (encode its negative entries, decode their coefficients);
- the dense BiPO add h + m*v (the cheapest steering there is);
- the op on the dense trained YaPO vector.

Run: bash scripts/bench.sh bench/bench_trained_vectors.py   (table in bench/results/bench_trained_vectors.md)
"""

import functools
from pathlib import Path

import pytest
import torch

from yapo_fast.kernels.sparse_steer import prepare_sparse_steer, sparse_steer

pytestmark = pytest.mark.usefixtures("bench_threads")
MODULE = "bench_trained_vectors"
VECTORS = sorted((Path(__file__).parent / "artifacts" / "vectors").glob("*.safetensors"))


@functools.lru_cache(maxsize=None)
def states(T: int) -> torch.Tensor:
    """Layer-15 outputs of the default model on T real tokens (a held-out hallucination question)."""
    import yapo_fast as yf
    from yapo_fast.chat import format_prompt
    from yapo_fast.data.pairs import behaviour_path, load_pairs
    from yapo_fast.integrations.hf_hooks import capture_layer_output

    model, tok = yf.load_model()
    text = " ".join(
        format_prompt(tok, p.prompt) + p.chosen for p in load_pairs(behaviour_path("hallucination", "test"), limit=8)
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :T]
    with torch.no_grad(), capture_layer_output(model, 15) as seen:
        model(ids)
    return seen[0].reshape(-1, seen[0].shape[-1])[:T].float().contiguous()


@functools.lru_cache(maxsize=None)
def sae():
    import yapo_fast as yf

    return yf.load_sae()


@functools.lru_cache(maxsize=None)
def prepared(name: str, multiplier: float):
    import yapo_fast as yf

    vec = yf.load_vector(next(p for p in VECTORS if p.stem == name))
    return vec, prepare_sparse_steer(sae(), vec.latent(), multiplier)


CASES = [(p.stem, T, m) for p in VECTORS for T in (4, 64) for m in (1.0, -1.0)]


@pytest.mark.parametrize("name,T,m", CASES)
@pytest.mark.parametrize("path", ["op", "unavoidable_matmuls", "dense_add", "op_dense_vector"])
def test_trained_vector(benchmark, record, name, T, m, path):
    h = states(T)
    vec, prep = prepared(name, m)
    dense_name = next((p.stem for p in VECTORS if p.stem.endswith("-dense")), name)
    _, dense_prep = prepared(dense_name, m)
    coef = torch.randn(T, prep.n_dependent)
    bipo = torch.randn(h.shape[-1])
    fn = {
        "op": lambda: sparse_steer(h, prep),
        "unavoidable_matmuls": lambda: (torch.mm(h, prep.enc_cols), torch.mm(coef, prep.dec_rows)),
        "dense_add": lambda: h + m * bipo,
        "op_dense_vector": lambda: sparse_steer(h, dense_prep),
    }[path]
    benchmark.group = f"{name} (nnz {vec.values.numel()}, {prep.n_dependent} need the encoder) T={T} m={m:+g}"
    fn()
    benchmark.pedantic(fn, rounds=100 if T == 4 else 30, iterations=1, warmup_rounds=3)
    record(MODULE, benchmark.group, path, benchmark)
