"""The fused sparse steer (every CPU backend) against THE reference, kernels/sparse_steer_reference.py.

Triton runs in tests/test_kernels_sparse_steer_triton.py (TRITON_INTERPRET=1 must be set before its import).
TopK inputs here are random floats: no ties among pre-activations (the tie rule itself is tested
in tests/test_kernels_topk_threshold.py)."""

import functools

import pytest
import torch
from helpers import SAE_KINDS, random_latent, random_sae

from yapo_fast import YapoFastError
from yapo_fast.kernels.sparse_steer import prepare_sparse_steer, sparse_steer, stack_prepared
from yapo_fast.kernels.sparse_steer_reference import sparse_steer_reference

CPU_BACKENDS = ("torch", "numba")
MULTIPLIERS = (-2.0, -1.0, -0.5, 0.0, 1.0, 2.0)
# float32: both sides compute in float32 but sum in different orders (and the reference adds and
# subtracts two full decodes), so allow a few ulps of |h'|. bfloat16: the output is rounded to
# bf16 (8 bits of mantissa): one ulp of |h'| ~ 2^-8 relative, plus a float32 difference that can
# tip the rounding.
TOL = {torch.float32: dict(max_abs=2e-4, rms=2e-5), torch.bfloat16: dict(max_abs=6e-2, rms=8e-3)}


def hidden(T, d, seed=0, dtype=torch.float32):
    return (2.0 * torch.randn(T, d, generator=torch.Generator().manual_seed(seed))).to(dtype)


def assert_matches(got, want, dtype):
    tol = TOL[dtype]
    diff = (got.float() - want.float()).abs()
    scale = max(1.0, float(want.float().abs().max()))
    assert float(diff.max()) <= tol["max_abs"] * scale, f"max abs diff {float(diff.max()):.3g}"
    assert float(diff.pow(2).mean().sqrt()) <= tol["rms"] * scale, f"rms diff {float(diff.pow(2).mean().sqrt()):.3g}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("sign", ("pos", "neg", "mixed"))
@pytest.mark.parametrize("multiplier", MULTIPLIERS)
def test_matches_reference_signs_and_multipliers(backend, kind, sign, multiplier):
    sae = random_sae(kind, d_in=48, d_sae=96, seed=1)
    h = hidden(7, 48, seed=2)
    v = random_latent(96, 17, sign, seed=3)
    got = sparse_steer(h, prepare_sparse_steer(sae, v, multiplier), backend=backend)
    want = sparse_steer_reference(h, sae, v, multiplier)
    assert_matches(got, want, torch.float32)
    if multiplier != 0.0:  # the op really moves h: a no-op would fail
        assert float((got - h).abs().max()) > 1e-2


SHAPES = [  # (T, d_model, d_sae, support): odd sizes, support 1 / 17 / all; few big ones
    (1, 48, 96, 1),
    (7, 64, 1000, 17),
    (300, 64, 96, 96),
    (7, 576, 1000, 1000),
    (300, 576, 9216, 17),
    (1, 576, 9216, 9216),
]


@functools.lru_cache(maxsize=None)
def cached_sae(kind, d_model, d_sae):
    """Big random SAEs are built once per module (building a 576 x 9216 SAE costs more than the op)."""
    return random_sae(kind, d_in=d_model, d_sae=d_sae, seed=d_sae)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("T,d_model,d_sae,support", SHAPES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_matches_reference_shapes_and_dtypes(backend, kind, T, d_model, d_sae, support, dtype):
    sae = cached_sae(kind, d_model, d_sae)
    h = hidden(T, d_model, seed=support, dtype=dtype)
    v = random_latent(d_sae, support, "mixed", seed=5)
    got = sparse_steer(h, prepare_sparse_steer(sae, v, -1.5), backend=backend)
    assert got.dtype == dtype and got.shape == h.shape
    assert_matches(got, sparse_steer_reference(h, sae, v, -1.5), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bfloat16_sae_and_leading_dims(backend):
    sae = random_sae("jumprelu", d_in=64, d_sae=96, seed=4, dtype=torch.bfloat16)
    h = hidden(2 * 5, 64, seed=1).view(2, 5, 64)
    v = random_latent(96, 30, "mixed", seed=2)
    got = sparse_steer(h, prepare_sparse_steer(sae, v, 2.0), backend=backend)
    assert_matches(got, sparse_steer_reference(h, sae, v, 2.0), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_and_out_equal_new_tensor(backend):
    sae = random_sae("jumprelu", d_in=64, d_sae=96, seed=4)
    prepared = prepare_sparse_steer(sae, random_latent(96, 17, "mixed", seed=1), -1.0)
    h = hidden(9, 64)
    fresh = sparse_steer(h, prepared, backend=backend)
    assert not torch.equal(fresh, h)
    out = torch.full_like(h, float("nan"))
    assert sparse_steer(h, prepared, out=out, backend=backend) is out
    h2 = h.clone()
    assert sparse_steer(h2, prepared, inplace=True, backend=backend) is h2
    torch.testing.assert_close(out, fresh, rtol=0, atol=0)
    torch.testing.assert_close(h2, fresh, rtol=0, atol=0)
    strided = hidden(9, 128)[:, ::2]  # non-contiguous input and in-place target
    want = sparse_steer(strided.contiguous(), prepared, backend=backend)
    assert_matches(sparse_steer(strided, prepared, inplace=True, backend=backend), want, torch.float32)
    assert_matches(strided, want, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", SAE_KINDS)
def test_slots_give_each_token_its_single_vector_result(backend, kind):
    sae = random_sae(kind, d_in=64, d_sae=200, seed=7)
    vectors = [
        (random_latent(200, 1, "neg", seed=1), 1.0),
        (random_latent(200, 40, "mixed", seed=2), -2.0),
        (random_latent(200, 9, "pos", seed=3), 0.5),
    ]
    prepared = [prepare_sparse_steer(sae, v, m) for v, m in vectors]
    slots = stack_prepared(prepared)
    h = hidden(31, 64, seed=3)
    slot_index = torch.tensor([(t % 4) - 1 for t in range(31)])  # -1, 0, 1, 2, -1, ...
    got = sparse_steer(h, slots, slot_index=slot_index, backend=backend)
    for t in range(31):
        s = int(slot_index[t])
        if s < 0:
            assert torch.equal(got[t], h[t])  # unsteered tokens are copied exactly
        else:
            single = sparse_steer(h[t : t + 1], prepared[s], backend=backend)[0]
            torch.testing.assert_close(got[t], single, rtol=1e-6, atol=1e-5)
            v, m = vectors[s]
            assert_matches(got[t : t + 1], sparse_steer_reference(h[t : t + 1], sae, v, m), torch.float32)


def test_bad_input_is_named():
    sae = random_sae("relu", d_in=64, d_sae=96)
    prepared = prepare_sparse_steer(sae, random_latent(96, 5, "neg"), 1.0)
    with pytest.raises(YapoFastError, match="d_model=64"):
        sparse_steer(torch.randn(3, 32), prepared)
    with pytest.raises(YapoFastError, match="d_sae=96"):
        prepare_sparse_steer(sae, torch.zeros(95), 1.0)
    with pytest.raises(YapoFastError, match="slot_index"):
        sparse_steer(torch.randn(3, 64), stack_prepared([prepared]))
    with pytest.raises(YapoFastError, match="slot_index values"):
        sparse_steer(torch.randn(3, 64), stack_prepared([prepared]), slot_index=torch.tensor([0, 1, -1]))
    with pytest.raises(YapoFastError, match="YAPO_FAST_KERNEL"):
        sparse_steer(torch.randn(3, 64), prepared, backend="cuda-magic")
    with pytest.raises(YapoFastError, match="CUDA"):
        sparse_steer(torch.randn(3, 64), prepared, backend="triton")


def test_env_var_forces_backend(monkeypatch):
    import yapo_fast.kernels.sparse_steer_numba as numba_path
    import yapo_fast.kernels.sparse_steer_torch as torch_path

    calls = []
    real_torch, real_numba = torch_path.steer_one, numba_path.steer_numba_prepared
    monkeypatch.setattr("yapo_fast.kernels.sparse_steer.steer_one", lambda *a: calls.append("torch") or real_torch(*a))
    monkeypatch.setattr(numba_path, "steer_numba_prepared", lambda *a: calls.append("numba") or real_numba(*a))
    sae = random_sae("relu", d_in=64, d_sae=96)
    prepared = prepare_sparse_steer(sae, random_latent(96, 5, "neg"), 1.0)
    for forced in ("numba", "torch"):
        monkeypatch.setenv("YAPO_FAST_KERNEL", forced)
        sparse_steer(torch.randn(3, 64), prepared)
    assert calls == ["numba", "torch"]
    monkeypatch.setenv("YAPO_FAST_KERNEL", "nope")
    with pytest.raises(YapoFastError, match="nope"):
        sparse_steer(torch.randn(3, 64), prepare_sparse_steer(sae, random_latent(96, 5, "neg"), 1.0))


def test_default_cpu_backend_follows_the_measured_rule(monkeypatch):
    """CPU default (kernels/sparse_steer_backend.py, numbers in docs/benchmarks.md): numba at decode
    shapes (T <= 8, n <= 512, T * n <= 2048), the torch path elsewhere; YAPO_FAST_KERNEL forces."""
    import yapo_fast.kernels.sparse_steer_numba as numba_path

    monkeypatch.delenv("YAPO_FAST_KERNEL", raising=False)
    calls = []
    real_torch, real_numba = sparse_steer_module().steer_one, numba_path.steer_numba_prepared
    monkeypatch.setattr("yapo_fast.kernels.sparse_steer.steer_one", lambda *a: calls.append("torch") or real_torch(*a))
    monkeypatch.setattr(numba_path, "steer_numba_prepared", lambda *a: calls.append("numba") or real_numba(*a))
    sae = random_sae("jumprelu", d_in=64, d_sae=1200, seed=2)
    small = prepare_sparse_steer(sae, random_latent(1200, 16, "mixed", seed=1), 1.0)  # n = 8
    mid = prepare_sparse_steer(sae, random_latent(1200, 600, "mixed", seed=1), 1.0)  # n = 300
    large = prepare_sparse_steer(sae, random_latent(1200, 1100, "mixed", seed=1), 1.0)  # n = 550
    for T, prepared, want in (
        (1, small, "numba"),
        (8, small, "numba"),
        (9, small, "torch"),
        (300, small, "torch"),
        (4, mid, "numba"),
        (8, mid, "torch"),
        (1, large, "torch"),
    ):
        h = hidden(T, 64, seed=T)
        calls.clear()
        got = sparse_steer(h, prepared)
        assert calls == [want], (T, prepared.n_dependent, calls)
        assert_matches(got, sparse_steer(h, prepared, backend="torch" if want == "numba" else "numba"), torch.float32)
    # TopK at a decode shape: the steer runs on numba, the k-th-largest op on ITS measured default
    # (torch; its numba kernel is ~10x slower), not on the steer's backend.
    import yapo_fast.kernels.topk_threshold as threshold_module

    real_threshold = threshold_module.topk_threshold_torch
    monkeypatch.setattr(
        threshold_module, "topk_threshold_torch", lambda *a: calls.append("topk torch") or real_threshold(*a)
    )
    topk_sae = random_sae("topk", d_in=64, d_sae=300, k=16, seed=3)
    v = random_latent(300, 16, "mixed", seed=2)
    calls.clear()
    got = sparse_steer(hidden(1, 64), prepare_sparse_steer(topk_sae, v, 1.0))
    assert calls == ["topk torch", "numba"]
    assert_matches(got, sparse_steer_reference(hidden(1, 64), topk_sae, v, 1.0), torch.float32)
    monkeypatch.setenv("YAPO_FAST_KERNEL", "torch")
    calls.clear()
    sparse_steer(hidden(1, 64), small)
    assert calls == ["torch"]


def sparse_steer_module():
    import yapo_fast.kernels.sparse_steer as module

    return module


# ---- gradients wrt h and the vector's values: gradcheck in float64, and equality with autograd
# through THE reference (float32, every CPU backend's forward) ------------------------------------


@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("multiplier", (-2.0, -0.5, 1.0))
def test_gradcheck_float64(kind, multiplier):
    sae = random_sae(kind, d_in=12, d_sae=20, seed=3).to(dtype=torch.float64)
    h = (2.0 * torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).requires_grad_()
    v = random_latent(20, 9, "mixed", seed=2).double().requires_grad_()
    support = torch.nonzero(v.detach()).flatten()

    def f(h, v):
        return sparse_steer(h, prepare_sparse_steer(sae, v, multiplier, support=support))

    assert torch.autograd.gradcheck(f, (h, v), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ("torch", "numba"))
@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("sign", ("neg", "mixed", "pos"))
@pytest.mark.parametrize("multiplier", (-2.0, -1.0, 0.0, 2.0))
def test_grads_match_autograd_through_reference(backend, kind, sign, multiplier):
    sae = random_sae(kind, d_in=48, d_sae=300, seed=5)
    h0 = 2.0 * torch.randn(13, 48, generator=torch.Generator().manual_seed(6))
    v0 = random_latent(300, 40, sign, seed=7)
    support = torch.nonzero(v0).flatten()
    weight = torch.randn(13, 48, generator=torch.Generator().manual_seed(8))  # a non-trivial loss

    h_ref, v_ref = h0.clone().requires_grad_(), v0.clone().requires_grad_()
    (sparse_steer_reference(h_ref, sae, v_ref, multiplier) * weight).sum().backward()

    h, v = h0.clone().requires_grad_(), v0.clone().requires_grad_()
    (sparse_steer(h, prepare_sparse_steer(sae, v, multiplier), backend=backend) * weight).sum().backward()

    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-4, atol=1e-4)
    # The op differentiates wrt the support only (the vector's trained coordinates).
    torch.testing.assert_close(v.grad[support], v_ref.grad[support], rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(v.grad[~torch.isin(torch.arange(300), support)]) == 0
    if multiplier != 0.0:
        assert float(v.grad.abs().max()) > 1e-3


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_grad_from_zero_vector_with_explicit_support(kind):
    """The trainer starts at v = 0: every support entry is 'dependent' and d/dv = m * 1[z > 0] * g.W_dec."""
    sae = random_sae(kind, d_in=48, d_sae=200, seed=9)
    h = 2.0 * torch.randn(11, 48, generator=torch.Generator().manual_seed(1))
    support = torch.arange(0, 200, 3)
    v = torch.zeros(200, requires_grad=True)
    sparse_steer(h, prepare_sparse_steer(sae, v, -1.0, support=support)).pow(2).sum().backward()
    v_ref = torch.zeros(200, requires_grad=True)
    sparse_steer_reference(h, sae, v_ref, -1.0).pow(2).sum().backward()
    torch.testing.assert_close(v.grad[support], v_ref.grad[support], rtol=1e-4, atol=1e-4)
    assert float(v.grad.abs().max()) > 1e-3
