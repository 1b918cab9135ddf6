"""Reliability (issue 8), property tests (hypothesis): the sparse steering op through every kernel
(torch, numba, Triton under TRITON_INTERPRET=1, the default dispatch, per-token slots, gradients)
equals THE reference (kernels/sparse_steer_reference.py) over random shapes, supports, signs,
values, multipliers and SAE kinds. Bounded example counts and no deadline keep it near 30 s.

TRITON_INTERPRET must be set before the Triton kernel modules are imported (as in
tests/test_kernels_sparse_steer_triton.py): set here, the kernels imported, the previous value restored."""

from helpers import import_triton_kernels  # noqa: E402

import_triton_kernels(always_interpret=True)

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import SAE_KINDS  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_kernels_sparse_steer import assert_matches  # noqa: E402

from yapo_fast import SAE  # noqa: E402
from yapo_fast.errors import MAX_ABS_MULTIPLIER  # noqa: E402
from yapo_fast.kernels.sparse_steer import prepare_sparse_steer, sparse_steer, stack_prepared  # noqa: E402
from yapo_fast.kernels.sparse_steer_reference import dense_steer_reference, sparse_steer_reference  # noqa: E402
from yapo_fast.steering import dense_steer  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def interpret_on_cpu(monkeypatch):
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


MULTIPLIER = st.one_of(
    st.floats(-3.0, 3.0, allow_nan=False), st.sampled_from([0.0, -MAX_ABS_MULTIPLIER, MAX_ABS_MULTIPLIER, 1.0, -1.0])
)


@st.composite
def problems(draw, max_T=9, max_d_in=24, max_d_sae=48, kinds=SAE_KINDS):
    """(sae, h, latent, multiplier): an SAE of a random kind and shape, hidden states, and a latent
    vector with a random support (empty to full) of random signs and magnitudes."""
    kind = draw(st.sampled_from(kinds))
    d_in = draw(st.integers(1, max_d_in))
    d_sae = draw(st.integers(1, max_d_sae))
    T = draw(st.integers(1, max_T))
    seed = draw(st.integers(0, 2**16))
    k = draw(st.integers(1, d_sae)) if kind == "topk" else None
    sae = SAE.random(kind, d_in, d_sae, k=k, seed=seed)
    if kind == "jumprelu":  # thresholds from tiny to large, so some latents fire and some do not
        sae.threshold = sae.threshold * draw(st.sampled_from([0.01, 0.3, 1.0]))
    support = draw(st.sets(st.integers(0, d_sae - 1), max_size=d_sae))
    latent = torch.zeros(d_sae)
    for i in sorted(support):
        latent[i] = draw(st.floats(0.01, 6.0)) * draw(st.sampled_from([-1.0, 1.0]))
    g = torch.Generator().manual_seed(seed + 1)
    h = 2.0 * torch.randn(T, d_in, generator=g) + sae.b_dec
    return sae, h, latent, draw(MULTIPLIER)


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@pytest.mark.parametrize("backend", ["torch", "numba", None])  # None: the default dispatch
@FAST
@given(p=problems())
def test_cpu_kernels_equal_the_reference(backend, p):
    sae, h, latent, m = p
    got = sparse_steer(h, prepare_sparse_steer(sae, latent, m), backend=backend)
    assert_matches(got, sparse_steer_reference(h, sae, latent, m), torch.float32)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(p=problems(max_T=5, max_d_in=12, max_d_sae=20))
def test_triton_kernel_under_the_interpreter_equals_the_reference(p):
    sae, h, latent, m = p
    device = "cuda" if HAS_CUDA else "cpu"
    got = sparse_steer(h.to(device), prepare_sparse_steer(sae.to(device), latent.to(device), m), backend="triton")
    assert_matches(got.cpu(), sparse_steer_reference(h, sae, latent, m), torch.float32)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(p=problems(), n_slots=st.integers(1, 4), data=st.data())
def test_per_token_slots_equal_each_tokens_own_vector(p, n_slots, data):
    """Several vectors (multipliers) in one batch, each token its own slot or -1 (unsteered): each
    token gets exactly its single-vector reference result."""
    sae, h, latent, m = p
    vectors = [(latent * (1.0 - 0.5 * i), m if i == 0 else data.draw(MULTIPLIER)) for i in range(n_slots)]
    slots = stack_prepared([prepare_sparse_steer(sae, v, mm) for v, mm in vectors])
    slot_index = torch.tensor(data.draw(st.lists(st.integers(-1, n_slots - 1), min_size=len(h), max_size=len(h))))
    backend = data.draw(st.sampled_from(["torch", "numba"]))
    got = sparse_steer(h, slots, slot_index=slot_index, backend=backend)
    for t, s in enumerate(slot_index.tolist()):
        want = h[t : t + 1] if s < 0 else sparse_steer_reference(h[t : t + 1], sae, *vectors[s])
        assert_matches(got[t : t + 1], want, torch.float32)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(p=problems())
def test_gradients_equal_the_references(p):
    """d/dh and d/d(latent values) through the fused op equal autograd through the reference
    (away from the kinks of ReLU/JumpReLU/TopK, which random continuous inputs avoid)."""
    sae, h, latent, m = p
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(3))
    support = torch.nonzero(latent).flatten()
    h_ref, v_ref = h.clone().requires_grad_(), latent.clone().requires_grad_()
    (sparse_steer_reference(h_ref, sae, v_ref, m) * w).sum().backward()
    h1, v1 = h.clone().requires_grad_(), latent.clone().requires_grad_()
    (sparse_steer(h1, prepare_sparse_steer(sae, v1, m), backend="torch") * w).sum().backward()
    assert_matches(h1.grad, h_ref.grad, torch.float32)
    if support.numel():
        assert_matches(v1.grad[support], v_ref.grad[support], torch.float32)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(T=st.integers(1, 9), d=st.integers(1, 40), m=MULTIPLIER, seed=st.integers(0, 2**16))
def test_dense_steer_equals_its_reference(T, d, m, seed):
    g = torch.Generator().manual_seed(seed)
    h, v = torch.randn(T, d, generator=g), torch.randn(d, generator=g)
    assert torch.equal(dense_steer(h, v, m), dense_steer_reference(h, v, m))
