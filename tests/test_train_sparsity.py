"""The sparsity step of the trainer (train/sparsity.py) against plain references on tensors, and
in training: entries outside the support stay exactly zero, AdamW moments of zeroed entries are
zeroed, a killed run resumes to the same sparse vector, bad settings are refused."""

import pytest
import torch
from trainer_fixtures import KW, single_thread, tiny_pairs, tiny_setup  # noqa: F401 (autouse fixture)

import yapo_fast
from yapo_fast.errors import YapoFastError
from yapo_fast.train.sparsity import prune_by_effect, sparsify_step_, support_at, topk_mask


def reference_topk(v, k, norms=None, tiebreak=None):
    """Plain loop: rank entries by |v_i| * norm_i, ties by the larger tiebreak, then the lower index."""
    scores = [
        (
            abs(float(x)) * (1.0 if norms is None else float(norms[i])),
            0.0 if tiebreak is None else float(tiebreak[i]),
            -i,
        )
        for i, x in enumerate(v)
    ]
    keep = {-j for _, _, j in sorted(scores, reverse=True)[:k]}
    return torch.tensor([float(x) if i in keep else 0.0 for i, x in enumerate(v)])


def reference_soft_threshold(v, tau):
    return torch.tensor([(abs(float(x)) - tau) * (1 if x > 0 else -1) if abs(float(x)) > tau else 0.0 for x in v])


class FakeAdam:
    def __init__(self, v):
        self.state = {
            v: {"exp_avg": torch.ones_like(v), "exp_avg_sq": torch.full_like(v, 2.0), "step": torch.tensor(3)}
        }


@pytest.mark.parametrize("k", [1, 3, 7, 50])
@pytest.mark.parametrize("with_norms", [False, True])
def test_topk_projection_equals_the_plain_reference(k, with_norms):
    g = torch.Generator().manual_seed(k)
    v = torch.randn(37, generator=g)
    v[5] = v[9] = 0.75  # a tie: the lower index wins
    norms = torch.rand(37, generator=g) + 0.5 if with_norms else None
    want = reference_topk(v.tolist(), k, norms)
    got = v.clone()
    opt = FakeAdam(got)
    sparsify_step_(got, opt, support=k, l1=0.0, lr=0.1, row_norms=norms)
    assert torch.equal(got, want)
    zero = want == 0
    assert torch.equal(opt.state[got]["exp_avg"], (~zero).float())
    assert torch.equal(opt.state[got]["exp_avg_sq"], 2.0 * (~zero).float())


@pytest.mark.parametrize("tau", [0.0, 0.3, 1.2])
def test_soft_threshold_equals_the_plain_reference(tau):
    v = torch.randn(41, generator=torch.Generator().manual_seed(1))
    got = v.clone()
    sparsify_step_(got, FakeAdam(got), support=None, l1=tau / 0.5, lr=0.5)  # threshold = lr * l1
    torch.testing.assert_close(got, reference_soft_threshold(v.tolist(), tau))


def test_topk_mask_keeps_everything_when_k_is_large():
    assert topk_mask(torch.tensor([0.0, 2.0, -1.0]), 5).all()


def test_ties_go_to_the_larger_second_moment():
    """After AdamW's first step every touched entry has |v_i| = lr: the gradient decides, not the index."""
    v = torch.tensor([0.1, -0.1, 0.1, 0.1, -0.1, 0.0])
    opt = FakeAdam(v)
    opt.state[v]["exp_avg_sq"] = torch.tensor([1.0, 9.0, 4.0, 0.5, 9.0, 7.0])
    want = reference_topk(v.tolist(), 3, tiebreak=opt.state[v]["exp_avg_sq"].tolist())
    sparsify_step_(v, opt, support=3, l1=0.0, lr=0.1)
    assert torch.equal(v, want) and torch.equal(v.nonzero().flatten(), torch.tensor([1, 2, 4]))


def test_support_schedule_is_cubic_from_d_to_k_over_half_the_steps():
    d, k, total = 1000, 10, 40
    ks = [support_at(t, total, k, d) for t in range(total + 1)]
    assert ks[0] == d and ks[20] == k and ks[-1] == k and all(a >= b for a, b in zip(ks, ks[1:]))
    assert ks[10] == round(k + (d - k) * 0.5**3)


@pytest.mark.parametrize("kind", ["relu", "topk"])
def test_training_with_a_support_budget_keeps_at_most_k_entries_every_step(kind, tmp_path):
    model, tok, sae = tiny_setup(kind)
    nnz = []
    res = yapo_fast.train(
        "yapo",
        tiny_pairs(6),
        model=model,
        tokenizer=tok,
        sae=sae,
        support=5,
        callback=lambda rec: nnz.append(rec["nnz"]),
        out=tmp_path / "v.safetensors",
        **KW,
    )
    dense = yapo_fast.train("yapo", tiny_pairs(6), model=model, tokenizer=tok, sae=sae, **KW)
    total = len(nnz)
    assert all(n <= support_at(t + 1, total, 5, sae.d_sae) for t, n in enumerate(nnz))
    assert max(nnz[total // 2 :]) <= 5 and nnz[-1] == 5 and dense.vector.values.numel() > 5
    assert res.vector.values.numel() == 5  # the saved vector holds only its support
    assert yapo_fast.load_vector(tmp_path / "v.safetensors").values.numel() == 5
    assert res.vector.info["support"] == 5


def test_a_killed_sparse_run_resumes_to_the_same_vector(tmp_path):
    model, tok, sae = tiny_setup("relu")
    pairs = tiny_pairs(5)
    kw = dict(model=model, tokenizer=tok, sae=sae, support=4, l1=0.05, **KW)
    full = yapo_fast.train("yapo", pairs, out=tmp_path / "full.safetensors", **kw)

    def kill(rec):
        if rec["step"] == 5:
            raise KeyboardInterrupt

    out = tmp_path / "killed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        yapo_fast.train("yapo", pairs, out=out, checkpoint_every=2, callback=kill, **kw)
    resumed = yapo_fast.train("yapo", pairs, out=out, checkpoint_every=2, **kw)
    assert resumed.resumed_from == 4
    assert torch.equal(resumed.vector.latent(), full.vector.latent())
    # a dense run does not resume from the sparse run's checkpoint
    with pytest.raises(YapoFastError, match="different run"):
        yapo_fast.train("yapo", pairs, out=out, **{**kw, "support": None})


def test_prune_by_effect_keeps_the_largest_entries():
    model, tok, sae = tiny_setup("relu")
    latent = torch.zeros(sae.d_sae)
    latent[[3, 10, 20, 40]] = torch.tensor([0.5, -2.0, 1.0, -0.1])
    vec = yapo_fast.SteeringVector.from_latent(latent, layer=1, sae=sae)
    norms = sae.W_dec.norm(dim=1)
    pruned = prune_by_effect(vec, 2, sae)
    want = reference_topk(latent.tolist(), 2, norms)
    assert torch.equal(pruned.latent(), want) and pruned.info["pruned_to"] == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="bipo", support=4), "not 'bipo'"),
        (dict(method="yapo", support=0), "support must be a positive integer"),
        (dict(method="yapo", support=10**6), "exceeds the SAE's"),
        (dict(method="yapo", l1=-1.0), "l1 must be a non-negative"),
    ],
)
def test_bad_sparsity_settings_are_refused(kwargs, match):
    model, tok, sae = tiny_setup("relu")
    method = kwargs.pop("method")
    with pytest.raises(YapoFastError, match=match):
        yapo_fast.train(
            method, tiny_pairs(4), model=model, tokenizer=tok, sae=sae if method == "yapo" else None, **kwargs, **KW
        )
