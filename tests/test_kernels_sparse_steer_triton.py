"""The Triton kernels against the references: on the CPU under TRITON_INTERPRET=1 (float32, small
shapes: checks the logic, not speed), and on a CUDA GPU when one exists (tests marked gpu,
deselected with a reason elsewhere: see conftest.py).

TRITON_INTERPRET must be set before the kernel modules are imported (triton.jit reads it when
decorating), so it is set here, the kernels imported, and the previous value restored; an
autouse fixture sets it again only while this module's tests run, leaving other tests alone."""

import torch
from helpers import import_triton_kernels  # noqa: E402

import_triton_kernels()

import contextlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import SAE_KINDS, random_latent, random_sae  # noqa: E402
from test_kernels_sparse_steer import assert_matches, hidden  # noqa: E402
from test_kernels_topk_threshold import integer_topk_sae, steer_with_tie_rule  # noqa: E402

from yapo_fast.kernels.sparse_steer import _per_slot, prepare_sparse_steer, sparse_steer, stack_prepared  # noqa: E402
from yapo_fast.kernels.sparse_steer_reference import sparse_steer_reference  # noqa: E402
from yapo_fast.kernels.sparse_steer_triton import steer_triton  # noqa: E402
from yapo_fast.kernels.topk_threshold import topk_threshold  # noqa: E402
from yapo_fast.kernels.topk_threshold_reference import topk_cut, topk_threshold_reference  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def interpret_on_cpu(monkeypatch):
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


DEVICE = "cuda" if HAS_CUDA else "cpu"


@contextlib.contextmanager
def recorded_stores():
    """Every address a Triton kernel stores to while interpreted (the interpreter funnels each
    tl.store through its builder's create_masked_store). Records nothing on a real GPU."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    addresses = []
    real = builder.create_masked_store

    def spy(ptrs, value, mask, cache_policy):
        addresses.append(np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)].astype(np.int64).ravel())
        return real(ptrs, value, mask, cache_policy)

    builder.create_masked_store = spy
    try:
        yield addresses
    finally:
        del builder.create_masked_store


def tensor_addresses(t):
    return t.data_ptr() + t.element_size() * np.arange(t.numel(), dtype=np.int64)


# TopK under the interpreter is slow (bitonic sorts run as numpy ops): one TopK case per test.
CASES = [
    (kind, sign, m)
    for kind in ("relu", "jumprelu")
    for sign, m in [("mixed", -2.0), ("neg", 1.0), ("pos", -0.5), ("mixed", 0.0)]
] + [("topk", "mixed", -2.0)]


@pytest.mark.parametrize("kind,sign,multiplier", CASES)
def test_steer_matches_reference(kind, sign, multiplier):
    sae = random_sae(kind, d_in=48, d_sae=96, seed=1)
    h = hidden(37, 48, seed=2)
    v = random_latent(96, 17, sign, seed=3)
    got = sparse_steer(h.to(DEVICE), prepare_sparse_steer(sae.to(DEVICE), v.to(DEVICE), multiplier), backend="triton")
    assert_matches(got.cpu(), sparse_steer_reference(h, sae, v, multiplier), torch.float32)
    if multiplier != 0.0:
        assert float((got.cpu() - h).abs().max()) > 1e-2


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_steer_support_all_and_single(kind):
    sae = random_sae(kind, d_in=40, d_sae=70, seed=4)
    h = hidden(5, 40, seed=5)
    for support in (1, 70):
        v = random_latent(70, support, "mixed", seed=support)
        got = sparse_steer(h.to(DEVICE), prepare_sparse_steer(sae.to(DEVICE), v.to(DEVICE), -1.0), backend="triton")
        assert_matches(got.cpu(), sparse_steer_reference(h, sae, v, -1.0), torch.float32)


def test_slots_inplace_and_grads():
    sae = random_sae("jumprelu", d_in=48, d_sae=96, seed=7).to(DEVICE)
    prepared = [
        prepare_sparse_steer(sae, random_latent(96, n, "mixed", seed=n).to(DEVICE), m)
        for n, m in ((3, 1.0), (40, -2.0))
    ]
    h = hidden(23, 48, seed=3).to(DEVICE)
    slot_index = torch.tensor([(t % 3) - 1 for t in range(23)], device=DEVICE)
    got = sparse_steer(h, stack_prepared(prepared), slot_index=slot_index, backend="triton")
    for t in range(23):
        s = int(slot_index[t])
        want = h[t] if s < 0 else sparse_steer(h[t : t + 1], prepared[s], backend="torch")[0]
        torch.testing.assert_close(got[t], want, rtol=1e-6, atol=1e-5)
    h2 = h.clone()
    assert sparse_steer(h2, prepared[1], inplace=True, backend="triton") is h2
    torch.testing.assert_close(h2, sparse_steer(h, prepared[1], backend="torch"), rtol=1e-6, atol=1e-5)
    # Gradients: the Triton forward + Triton backward equal autograd through the reference.
    v = random_latent(96, 40, "mixed", seed=40).to(DEVICE).requires_grad_()
    hg = h.clone().requires_grad_()
    sparse_steer(hg, prepare_sparse_steer(sae, v, -2.0), backend="triton").pow(2).sum().backward()
    v2, hg2 = v.detach().clone().requires_grad_(), h.clone().requires_grad_()
    sparse_steer_reference(hg2, sae, v2, -2.0).pow(2).sum().backward()
    torch.testing.assert_close(hg.grad, hg2.grad, rtol=1e-4, atol=1e-4)
    support = torch.nonzero(v.detach()).flatten()
    torch.testing.assert_close(v.grad[support], v2.grad[support], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T,d_sae,k", [(9, 96, 12), (17, 300, 5), (4, 40, 40)])
def test_topk_threshold_matches_reference(T, d_sae, k):
    sae = random_sae("topk", d_in=48, d_sae=d_sae, k=k, seed=d_sae)
    p = prepare_sparse_steer(sae, random_latent(d_sae, 1, "neg"), 1.0)
    x = hidden(T, 48, seed=T)
    with recorded_stores() as addresses:
        kth, nxt = topk_threshold(x.to(DEVICE), p.topk_W_enc.to(DEVICE), p.topk_b_enc.to(DEVICE), k, backend="triton")
    if not HAS_CUDA:  # never writes the (T, d_sae) pre-activations: only 2 floats per token, once each
        written = np.sort(np.concatenate(addresses))
        assert np.array_equal(written, np.sort(np.concatenate([tensor_addresses(kth), tensor_addresses(nxt)])))
    want_kth, want_next = topk_threshold_reference(x, p.topk_W_enc, p.topk_b_enc, k)
    torch.testing.assert_close(kth.cpu(), want_kth, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(nxt.cpu(), want_next, rtol=1e-5, atol=1e-4)


def test_topk_ties_follow_the_rule():
    sae = integer_topk_sae()
    x = torch.randint(-2, 3, (20, 16), generator=torch.Generator().manual_seed(1)).float()
    v = torch.where(torch.arange(64) % 2 == 0, -1.5, 0.75)
    got = sparse_steer(x.to(DEVICE), prepare_sparse_steer(sae.to(DEVICE), v.to(DEVICE), -2.0), backend="triton")
    torch.testing.assert_close(got.cpu(), steer_with_tie_rule(x, sae, v, -2.0), rtol=1e-5, atol=1e-5)


# ---- the single-pass kernel's two variants ("rows": in place, support in registers; "tiles") ----
def torch_cut(x, prepared):
    """The TopK cut from the torch threshold path: the interpreter's Triton top-k is slow (its
    bitonic sorts run element by element), and it has its own tests above."""
    if prepared.kind != "topk" or prepared.coef.shape[-1] == 0:
        return None
    return topk_cut(*topk_threshold(x, prepared.topk_W_enc, prepared.topk_b_enc, prepared.k, backend="torch"))


def run_variant(x, out, prepared, variant, slot=None):
    tensors = _per_slot(prepared)
    return steer_triton(x, out, slot, *tensors, torch_cut(x, prepared), variant=variant)


# Odd shapes that cross every tile edge: T 21 = 2 token tiles (16), d_model 72 = 2 output tiles
# (64) and 2 encode chunks (64); support 70 mixed = 35 negative entries = 2 support blocks of
# "tiles" (32), N_PAD 64 for "rows". (Signs and multipliers: CASES above, default variant.)
@pytest.mark.parametrize("variant", ("rows", "tiles"))
@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("in_place", (False, True))
def test_single_pass_variants_match_reference(variant, kind, in_place):
    sae = random_sae(kind, d_in=72, d_sae=150, seed=11, k=9 if kind == "topk" else None).to(DEVICE)
    h = hidden(21, 72, seed=12).to(DEVICE)
    v = random_latent(150, 70, "mixed", seed=13).to(DEVICE)
    prepared = prepare_sparse_steer(sae, v, -2.0)
    x = h.clone()
    got = run_variant(x, x if in_place else torch.empty_like(x), prepared, variant)
    assert_matches(got.cpu(), sparse_steer_reference(h, sae, v, -2.0).cpu(), torch.float32)
    assert float((got - h).abs().max()) > 1e-2
    if in_place:
        assert got is x


@pytest.mark.parametrize("variant", ("rows", "tiles"))
@pytest.mark.parametrize("kind", ("jumprelu", "topk"))
def test_single_pass_slots(variant, kind):
    """Several vectors in one batch (one padded to the others' support): each token gets exactly
    its single-vector result; slot -1 tokens are copied bit for bit."""
    sae = random_sae(kind, d_in=72, d_sae=120, seed=7, k=8 if kind == "topk" else None).to(DEVICE)
    vectors = [
        (random_latent(120, 3, "neg", seed=1).to(DEVICE), 1.0),
        (random_latent(120, 50, "mixed", seed=2).to(DEVICE), -2.0),
        (random_latent(120, 9, "pos", seed=3).to(DEVICE), 0.5),
    ]
    prepared = [prepare_sparse_steer(sae, v, m) for v, m in vectors]
    h = hidden(29, 72, seed=3).to(DEVICE)
    slot_index = torch.tensor([(t * 7 % 4) - 1 for t in range(29)], device=DEVICE)
    got = run_variant(h, torch.empty_like(h), stack_prepared(prepared), variant, slot=slot_index)
    for t in range(29):
        s = int(slot_index[t])
        if s < 0:
            assert torch.equal(got[t], h[t])
        else:
            v, m = vectors[s]
            assert_matches(got[t : t + 1], sparse_steer_reference(h[t : t + 1], sae, v, m), torch.float32)


@pytest.mark.interpreter_only
@pytest.mark.parametrize("variant,in_place", [("rows", False), ("rows", True), ("tiles", False)])
def test_single_pass_writes_each_output_once_and_nothing_else(variant, in_place):
    """One launch, and the only memory written is h' itself, each element exactly once: no (T, n)
    coefficient buffer, no (T, d_sae) pre-activations, no temporary copy of h."""
    sae = random_sae("topk", d_in=72, d_sae=120, seed=5, k=8)
    prepared = prepare_sparse_steer(sae, random_latent(120, 60, "mixed", seed=5), -1.0)
    x = hidden(21, 72, seed=6)
    out = x if in_place else torch.empty_like(x)
    cut = torch_cut(x, prepared)
    with recorded_stores() as addresses:
        steer_triton(x, out, None, *_per_slot(prepared), cut, variant=variant)
    written = np.concatenate(addresses)
    assert written.size == out.numel()
    assert np.array_equal(np.sort(written), tensor_addresses(out))


# ---- compiled on a real GPU: bigger shapes and bfloat16 ----------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize(
    "T,d_model,d_sae,support", [(1, 576, 9216, 64), (300, 576, 9216, 17), (257, 2304, 16384, 4096)]
)
def test_gpu_steer_matches_reference(kind, dtype, T, d_model, d_sae, support):
    sae = random_sae(kind, d_in=d_model, d_sae=d_sae, seed=T).to("cuda")
    h = hidden(T, d_model, seed=1, dtype=dtype).cuda()
    v = random_latent(d_sae, support, "mixed", seed=2).cuda()
    got = sparse_steer(h, prepare_sparse_steer(sae, v, -1.5), backend="triton")
    assert got.dtype == dtype
    assert_matches(got, sparse_steer_reference(h, sae, v, -1.5), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ("rows", "tiles"))
@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("T,support", [(1, 64), (7, 17), (300, 200), (1000, 64)])
def test_gpu_single_pass_variants_in_place(variant, kind, T, support):
    sae = random_sae(kind, d_in=2304, d_sae=16384, seed=T, k=64 if kind == "topk" else None).to("cuda")
    h = hidden(T, 2304, seed=1).cuda()
    v = random_latent(16384, support, "mixed", seed=2).cuda()
    want = sparse_steer_reference(h, sae, v, -1.5)
    prepared = prepare_sparse_steer(sae, v, -1.5)
    x = h.clone()
    assert run_variant(x, x, prepared, variant) is x
    assert_matches(x, want, torch.float32)


@pytest.mark.gpu
def test_gpu_topk_threshold_matches_reference():
    sae = random_sae("topk", d_in=2304, d_sae=16384, k=64, seed=3).to("cuda")
    p = prepare_sparse_steer(sae, random_latent(16384, 1, "neg").cuda(), 1.0)
    x = hidden(300, 2304, seed=4).cuda()
    kth, nxt = topk_threshold(x, p.topk_W_enc, p.topk_b_enc, 64, backend="triton")
    want_kth, want_next = topk_threshold_reference(x, p.topk_W_enc, p.topk_b_enc, 64)
    torch.testing.assert_close(kth, want_kth, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(nxt, want_next, rtol=1e-5, atol=1e-4)
