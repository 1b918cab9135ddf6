"""The Triton backward of the fused sparse steer (d/dh and d/dv, kernels/sparse_steer_triton_backward.py)
against torch autograd through THE reference: on the CPU under TRITON_INTERPRET=1 (float32, small
odd shapes), and compiled on a CUDA GPU when one exists (marked gpu; deselected where there is none:
see conftest.py).

TRITON_INTERPRET must be set before the kernel modules are imported: see test_kernels_sparse_steer_triton.py."""

import torch
from helpers import import_triton_kernels  # noqa: E402

import_triton_kernels()
import pytest  # noqa: E402
from helpers import SAE_KINDS, random_latent, random_sae  # noqa: E402

import yapo_fast.kernels.sparse_steer as dispatch  # noqa: E402
import yapo_fast.kernels.sparse_steer_triton_backward as backward_module  # noqa: E402
from yapo_fast.kernels.sparse_steer import prepare_sparse_steer, sparse_steer, stack_prepared  # noqa: E402
from yapo_fast.kernels.sparse_steer_reference import sparse_steer_reference  # noqa: E402
from yapo_fast.kernels.topk_threshold import topk_threshold  # noqa: E402
from yapo_fast.kernels.topk_threshold_reference import topk_cut  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
MULTIPLIERS = (-2.0, -1.0, -0.5, 0.0, 1.0, 2.0)
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(autouse=True)
def interpret_on_cpu(monkeypatch):
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        # The interpreter's Triton top-k threshold is slow (bitonic sorts element by element) and
        # tested in test_kernels_sparse_steer_triton.py; here the TopK cut comes from the torch threshold path.
        monkeypatch.setattr(
            dispatch, "topk_threshold", lambda x, W, b, k, backend=None: topk_threshold(x, W, b, k, backend="torch")
        )


@pytest.fixture
def triton_backward_calls(monkeypatch):
    """Counts calls of the Triton backward, so a test proves it ran (not the torch backward)."""
    calls = []
    real = backward_module.steer_backward_triton

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(backward_module, "steer_backward_triton", counted)
    return calls


def grads(steer, h0, v0, weight, multiplier):
    h, v = h0.clone().requires_grad_(), v0.clone().requires_grad_()
    (steer(h, v, multiplier) * weight).sum().backward()
    return h.grad, v.grad


# T 19 = 2 token tiles (and 2 dv splits); support 45: up to 45 dependent entries = 2 support
# blocks. (d_model beyond one tile: the zero-vector test below, d_model 72.)
@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("sign", ("neg", "mixed", "pos"))
def test_backward_matches_autograd_through_reference(kind, sign, triton_backward_calls):
    sae = random_sae(kind, d_in=40, d_sae=150, seed=5, k=12 if kind == "topk" else None).to(DEVICE)
    h0 = (2.0 * torch.randn(19, 40, generator=torch.Generator().manual_seed(6))).to(DEVICE)
    v0 = random_latent(150, 45, sign, seed=7).to(DEVICE)
    support = torch.nonzero(v0).flatten()
    weight = torch.randn(19, 40, generator=torch.Generator().manual_seed(8)).to(DEVICE)  # a non-trivial loss
    h_path_cut = False  # some capped latent changed d/dh (g alone would be the identity's answer)
    for multiplier in MULTIPLIERS:
        want_h, want_v = grads(lambda h, v, m: sparse_steer_reference(h, sae, v, m), h0, v0, weight, multiplier)
        got_h, got_v = grads(
            lambda h, v, m: sparse_steer(h, prepare_sparse_steer(sae, v, m), backend="triton"),
            h0,
            v0,
            weight,
            multiplier,
        )
        torch.testing.assert_close(got_h, want_h, **TOL)
        torch.testing.assert_close(got_v[support], want_v[support], **TOL)
        assert torch.count_nonzero(got_v[~torch.isin(torch.arange(150, device=DEVICE), support)]) == 0
        if multiplier != 0.0:
            assert float(got_v.abs().max()) > 1e-3
        h_path_cut |= float((got_h - weight).abs().max()) > 1e-3
    assert h_path_cut
    assert len(triton_backward_calls) == len(MULTIPLIERS)


def test_backward_from_zero_vector_and_h_only(triton_backward_calls):
    """The trainer's start (v = 0 on an explicit support: every entry dependent, coefficient 0),
    and a call that needs d/dh only (h requires grad, v does not). d_model 72: 2 tiles of grad_h
    and 2 chunks of every reduction over d_model."""
    sae = random_sae("jumprelu", d_in=72, d_sae=90, seed=9).to(DEVICE)
    h = (2.0 * torch.randn(11, 72, generator=torch.Generator().manual_seed(1))).to(DEVICE)
    support = torch.arange(0, 90, 3, device=DEVICE)
    v = torch.zeros(90, device=DEVICE, requires_grad=True)
    sparse_steer(h, prepare_sparse_steer(sae, v, -1.0, support=support), backend="triton").pow(2).sum().backward()
    v_ref = torch.zeros(90, device=DEVICE, requires_grad=True)
    sparse_steer_reference(h, sae, v_ref, -1.0).pow(2).sum().backward()
    torch.testing.assert_close(v.grad[support], v_ref.grad[support], **TOL)
    assert float(v.grad.abs().max()) > 1e-3
    v1 = random_latent(90, 30, "mixed", seed=2).to(DEVICE)
    hg, hr = h.clone().requires_grad_(), h.clone().requires_grad_()
    sparse_steer(hg, prepare_sparse_steer(sae, v1, -2.0), backend="triton").pow(2).sum().backward()
    sparse_steer_reference(hr, sae, v1, -2.0).pow(2).sum().backward()
    torch.testing.assert_close(hg.grad, hr.grad, **TOL)
    assert [c["need_v"] for c in triton_backward_calls] == [True, False]


@pytest.mark.parametrize("kind", ("jumprelu", "topk"))
def test_backward_kernels_per_slot(kind):
    """Several vectors in one batch: dv is reduced over each slot's tokens only, and every token's
    d/dh is what its single-vector call gives (slot -1: the identity, g itself)."""
    sae = random_sae(kind, d_in=40, d_sae=120, seed=3, k=10 if kind == "topk" else None).to(DEVICE)
    vectors = [
        (random_latent(120, 6, "neg", seed=1), 1.0),
        (random_latent(120, 44, "mixed", seed=2), -2.0),
        (random_latent(120, 20, "mixed", seed=3), 0.5),
    ]
    prepared = [prepare_sparse_steer(sae, v.to(DEVICE), m) for v, m in vectors]
    slots = stack_prepared(prepared)
    T = 35
    h = (2.0 * torch.randn(T, 40, generator=torch.Generator().manual_seed(4))).to(DEVICE)
    g = torch.randn(T, 40, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    slot_index = torch.tensor([(t * 5 % 4) - 1 for t in range(T)], device=DEVICE)
    cut = None
    if kind == "topk":
        cut = topk_cut(*topk_threshold(h, slots.topk_W_enc, slots.topk_b_enc, slots.k, backend="torch"))
    grad_h, dv = backward_module.steer_backward_triton(
        h, g, slot_index, slots.enc_cols, slots.enc_bias, slots.thresholds, slots.coef, slots.dec_rows, cut
    )
    assert torch.equal(grad_h[slot_index < 0], g[slot_index < 0])
    for s, p in enumerate(prepared):
        rows = torch.nonzero(slot_index == s).flatten()
        hs = h[rows].clone().requires_grad_()
        values = p.values.detach().clone().requires_grad_()
        p_grad = prepare_sparse_steer(
            sae, torch.zeros(120, device=DEVICE).index_put((p.support,), values), p.multiplier, support=p.support
        )
        (sparse_steer(hs, p_grad, backend="torch") * g[rows]).sum().backward()
        torch.testing.assert_close(grad_h[rows], hs.grad, **TOL)
        want_dep = values.grad[p.dep_pos] / p.multiplier
        torch.testing.assert_close(dv[s, : p.n_dependent], want_dep, **TOL)
        assert torch.count_nonzero(dv[s, p.n_dependent :]) == 0  # padding entries get nothing
    assert float(dv.abs().max()) > 1e-3


# ---- compiled on a real GPU: bigger shapes and bfloat16 inputs --------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("T,support", [(1, 64), (300, 17), (1000, 512)])
def test_gpu_backward_matches_reference(kind, dtype, T, support):
    sae = random_sae(kind, d_in=2304, d_sae=16384, seed=T, k=64 if kind == "topk" else None).to("cuda")
    h0 = (2.0 * torch.randn(T, 2304, generator=torch.Generator().manual_seed(1))).to("cuda", dtype)
    v0 = random_latent(16384, support, "mixed", seed=2).cuda()
    weight = torch.randn(T, 2304, generator=torch.Generator().manual_seed(3)).cuda()
    support_ids = torch.nonzero(v0).flatten()
    want_h, want_v = grads(lambda h, v, m: sparse_steer_reference(h, sae, v, m).float(), h0, v0, weight, -1.5)
    got_h, got_v = grads(lambda h, v, m: sparse_steer(h, prepare_sparse_steer(sae, v, m)).float(), h0, v0, weight, -1.5)
    tol = TOL if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_h.float(), want_h.float(), **tol)
    scale = max(1.0, float(want_v.abs().max()))
    torch.testing.assert_close(got_v[support_ids] / scale, want_v[support_ids] / scale, **tol)
