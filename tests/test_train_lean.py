"""The lean trainer against the naive one (tests/naive_trainer.py): per-step loss and gradient,
the vector after 20 steps, sparsity of v, and the pieces of the lean forward."""

import pytest
import torch
from naive_trainer import NaiveTrainer
from trainer_fixtures import LAYER, single_thread, tiny_pairs, tiny_setup  # noqa: F401 (autouse fixture)

import yapo_fast
from yapo_fast.errors import YapoFastError
from yapo_fast.train import TrainConfig, batch_schedule
from yapo_fast.train.cache import build_cache, tokenize_pairs
from yapo_fast.train.lean import DecoderRunner
from yapo_fast.train.trainer import LeanObjective

CASES = [("yapo", "relu"), ("yapo", "jumprelu"), ("yapo", "topk"), ("bipo", None)]
PACK = {"topk": 40}  # small rows: a batch spreads over several packed rows
STEPS = 20  # 7 pairs in batches of 4 (the last batch of an epoch has 3): 2 steps per epoch, 10 epochs
SCHED = dict(batch_size=4, lr=2e-2, warmup_steps=3, seed=1)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("method,kind", CASES)
def test_lean_equals_naive_per_step_and_after_20_steps(method, kind):
    model, tok, sae = tiny_setup(kind or "relu")
    sae = sae if method == "yapo" else None
    pairs = tiny_pairs(7)
    naive = NaiveTrainer(method, model, tok, pairs, LAYER, sae=sae)
    v_naive, records = naive.train(epochs=10, steps=STEPS, record_grads=True, **SCHED)

    # 1) per step: the lean loss and gradient at the naive trajectory's v equal the naive ones
    runner = DecoderRunner(model)
    cache = build_cache(
        runner,
        tokenize_pairs(tok, pairs),
        list(range(len(pairs))),
        LAYER,
        sae=sae,
        batch_size=4,
        progress=False,
        pack_tokens=PACK.get(kind, 256),
    )
    pack = PACK.get(kind, 256)
    lean = LeanObjective(runner, cache, TrainConfig(method=method, layer=LAYER), sae, pack_tokens=pack)
    schedule = batch_schedule(len(pairs), 4, 10, 1)
    nonzero_grads = 0
    for (_, batch, d), rec in zip(schedule, records):
        v = rec["v"].clone().requires_grad_(True)
        loss = lean.loss_sum(batch, v, d) / len(batch)
        (grad,) = torch.autograd.grad(loss, v)
        assert rec["d"] == d
        assert abs(float(loss.detach()) - rec["loss"]) <= 1e-5 * abs(rec["loss"])
        if rec["grad"].norm() > 0:
            nonzero_grads += 1
            assert rel(grad, rec["grad"]) <= 1e-5, rel(grad, rec["grad"])
        else:
            assert float(grad.norm()) == 0.0
    assert nonzero_grads >= STEPS // 2  # the comparison is not vacuous

    # 2) the public trainer, end to end: same losses, same vector after 20 steps
    res = yapo_fast.train(
        method,
        pairs,
        model=model,
        tokenizer=tok,
        sae=sae,
        layer=LAYER,
        epochs=10,
        progress=False,
        pack_tokens=pack,
        **SCHED,
    )
    assert res.steps == STEPS and len(res.losses) == STEPS
    for got, rec in zip(res.losses, records):
        assert abs(got["loss"] - rec["loss"]) <= 1e-5 * abs(rec["loss"]) and got["d"] == rec["d"]
    v_lean = res.vector.latent() if method == "yapo" else res.vector.dense()
    assert float(v_naive.abs().max()) > 1e-3  # the vector moved
    torch.testing.assert_close(v_lean, v_naive, rtol=1e-4, atol=1e-5 * float(v_naive.abs().max()))
    if method == "yapo":  # sparsity: exactly the same support as the naive trainer
        assert torch.equal(v_lean != 0, v_naive != 0)


@pytest.mark.parametrize("kind", ["relu", "topk"])
def test_latents_that_never_fire_stay_exactly_zero(kind):
    model, tok, sae = tiny_setup(kind)
    pairs = tiny_pairs(6)
    res = yapo_fast.train(
        "yapo",
        pairs,
        model=model,
        tokenizer=tok,
        sae=sae,
        layer=LAYER,
        epochs=3,
        batch_size=2,
        lr=5e-2,
        warmup_steps=1,
        progress=False,
    )
    runner = DecoderRunner(model)
    cache = build_cache(runner, tokenize_pairs(tok, pairs), list(range(6)), LAYER, sae=sae, progress=False)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for i in range(6):
        for key in ("p", "c", "r"):
            fired[cache.get(i)[f"{key}_cols"].long()] = True
    v = res.vector.latent()
    assert 0 < int((v != 0).sum()) <= int(fired.sum()) < sae.d_sae
    assert torch.equal(v[~fired], torch.zeros(int((~fired).sum())))  # exactly zero, not merely small


def test_disk_spilled_cache_gives_the_same_vector(tmp_path):
    model, tok, sae = tiny_setup("topk")
    pairs = tiny_pairs(5)
    kw = dict(
        model=model,
        tokenizer=tok,
        sae=sae,
        layer=LAYER,
        epochs=2,
        batch_size=2,
        lr=5e-2,
        warmup_steps=1,
        progress=False,
    )
    a = yapo_fast.train("yapo", pairs, **kw)
    b = yapo_fast.train("yapo", pairs, cache_memory_bytes=0, **kw)
    assert torch.equal(a.vector.latent(), b.vector.latent())


@pytest.mark.parametrize("method", ["yapo", "bipo"])
def test_a_model_whose_weights_require_grad_gets_no_weight_gradients(method):
    """transformers models come back from from_pretrained with requires_grad=True: training v must
    neither compute weight gradients (wasted backward work) nor leave .grad on the caller's model,
    and the model's flags are as they were afterwards. Same vector as with a frozen model."""
    model, tok, sae = tiny_setup("jumprelu")
    pairs = tiny_pairs(4)
    kw = dict(
        tokenizer=tok,
        sae=sae if method == "yapo" else None,
        layer=LAYER,
        epochs=1,
        batch_size=2,
        lr=5e-2,
        warmup_steps=1,
        progress=False,
    )
    frozen = yapo_fast.train(method, pairs, model=model, **kw)
    model.requires_grad_(True)
    seen = []
    hooks = [p.register_hook(lambda g: seen.append(g.shape)) for p in model.parameters()]
    try:
        trainable = yapo_fast.train(method, pairs, model=model, **kw)
    finally:
        for h in hooks:
            h.remove()
    assert seen == [] and all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(frozen.vector.values, trainable.vector.values)


@pytest.mark.parametrize("pack_tokens", [1024, 6])
def test_lean_forward_equals_the_model_on_prompt_plus_response(llama, pack_tokens):
    """forward_from_layer at layer 0 (embeddings in) on packed rows (all pairs in one row, or one
    pair per row) equals the HF model's full forward of each prompt+response alone."""
    from yapo_fast.train.cache import response_targets
    from yapo_fast.train.lean import forward_from_layer, make_layout, scatter_rows

    runner = DecoderRunner(llama)
    prompts, responses = [[5, 6, 7], [9]], [[1, 2], [3], [4, 4, 4, 4], [8, 2]]
    lay = make_layout([3, 1], [2, 1, 4, 2], "cpu", pack_tokens)
    assert lay.n_rows == (1 if pack_tokens > 100 else 2)
    emb = lambda seqs: [runner.embed(torch.tensor(s)) for s in seqs]  # noqa: E731
    G, lp, lr = lay.n_rows, lay.pos_p.shape[1], lay.pos_r.shape[1]
    with torch.no_grad():
        tf, tp = response_targets([torch.tensor(r) for r in responses], "cpu")
        got = forward_from_layer(
            runner,
            0,
            scatter_rows(emb(prompts), lay.p_slots, G, lp),
            scatter_rows(emb(responses), lay.r_slots, G, lr),
            lay,
            tf,
            tp,
        )
        for j, r in enumerate(responses):
            p = prompts[j % 2]
            logp = torch.log_softmax(llama(torch.tensor([p + r])).logits[0].float(), -1)
            want = sum(float(logp[len(p) - 1 + t, tok]) for t, tok in enumerate(r))
            assert abs(float(got[j]) - want) <= 1e-5 * abs(want)


def test_bad_input_is_refused_with_a_clear_error():
    model, tok, sae = tiny_setup("relu")
    pairs = tiny_pairs(2)
    with pytest.raises(YapoFastError, match="unknown training method"):
        yapo_fast.train("dpo", pairs, model=model, tokenizer=tok, sae=sae, layer=LAYER)
    with pytest.raises(YapoFastError, match="reads layer"):
        yapo_fast.train("yapo", pairs, model=model, tokenizer=tok, sae=sae, layer=2)
    with pytest.raises(YapoFastError, match="tokenizer"):
        yapo_fast.train("bipo", pairs, model=model, layer=LAYER)
    with pytest.raises(YapoFastError, match="batch_size"):
        yapo_fast.train("bipo", pairs, model=model, tokenizer=tok, layer=LAYER, batch_size=0)
    with pytest.raises(YapoFastError, match="no preference pairs"):
        yapo_fast.train("bipo", [], model=model, tokenizer=tok, layer=LAYER)


@pytest.mark.parametrize("kind", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("branch", ["csr", "gemm", "gather"])
def test_yapo_delta_equals_the_reference_op_with_gradient(kind, branch, monkeypatch):
    from helpers import random_latent, random_sae

    from yapo_fast.kernels.sparse_steer_reference import sparse_steer_reference
    from yapo_fast.train import objective
    from yapo_fast.train.cache import sparse_codes

    monkeypatch.setattr(objective, "SPARSE_MATMUL", branch == "csr")
    monkeypatch.setattr(objective, "DENSE_CODE_LIMIT", 1 << 24 if branch == "gemm" else 0)
    sae = random_sae(kind, d_in=24, d_sae=40, seed=3)
    h = 2 * torch.randn(7, 24, generator=torch.Generator().manual_seed(1))
    codes = {k: t.long() if k != "vals" else t for k, t in sparse_codes(sae, h).items()}
    perm = torch.randperm(codes["rows"].numel(), generator=torch.Generator().manual_seed(4))
    codes = {k: t[perm] for k, t in codes.items()}  # entries in any order (as a packed batch has them)
    for m in (1, -1):
        v = random_latent(40, 12, "mixed", seed=2).requires_grad_(True)
        got = h + objective.yapo_delta(codes, 7, v, m, sae.W_dec)
        (g_got,) = torch.autograd.grad((got * h).sum(), v)
        want = sparse_steer_reference(h, sae, v, m)
        (g_want,) = torch.autograd.grad((want * h).sum(), v)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)
        assert g_want.abs().sum() > 0


def test_split_mlp_layers_equal_whole_layers_with_gradient(llama):
    """The runner's split layer (MLP on real tokens only, the last layer's MLP only where its output
    is read) gives the same log-probs and the same gradients as calling each whole layer, and a
    layer of another structure is detected and run whole."""
    from yapo_fast.train.cache import response_targets
    from yapo_fast.train.lean import forward_from_layer, make_layout

    runner = DecoderRunner(llama)
    assert runner.split_mlp
    lay = make_layout([3, 1, 2], [2, 1, 4, 2, 3, 1], "cpu", 12)  # 3 pairs over 2 padded rows
    G, lp, lr = lay.n_rows, lay.pos_p.shape[1], lay.pos_r.shape[1]
    assert G > 1 and lay.valid_p.numel() < G * lp and lay.valid_r.numel() < G * lr  # padding exists
    g = torch.Generator().manual_seed(0)
    hp0, hr0 = torch.randn(G, lp, 64, generator=g), torch.randn(G, lr, 64, generator=g)
    tf, tp = response_targets([torch.randint(1, 100, (n,), generator=g) for n in (2, 1, 4, 2, 3, 1)], "cpu")
    results = []
    for split in (True, False):
        runner.split_mlp = split
        hp, hr = hp0.clone().requires_grad_(True), hr0.clone().requires_grad_(True)
        out = forward_from_layer(runner, 1, hp, hr, lay, tf, tp)
        (out * torch.arange(1.0, 7.0)).sum().backward()
        results.append((out.detach(), hp.grad, hr.grad))
    for got, want in zip(*results):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    layer = runner.layers[0]
    whole = layer.forward
    layer.forward = lambda *a, **k: whole(*a, **k) * 2.0  # a layer that is not pre-norm attention + MLP
    try:
        assert not DecoderRunner(llama).split_mlp
    finally:
        del layer.forward
    assert DecoderRunner(llama).split_mlp


def test_chunked_lm_head_without_grad_equals_one_pass(llama, monkeypatch):
    runner = DecoderRunner(llama)
    g = torch.Generator().manual_seed(0)
    h, targets = torch.randn(11, 64, generator=g), torch.randint(0, 128, (11,), generator=g)
    whole = runner.token_logprobs(h, targets)  # autograd on: one pass
    monkeypatch.setattr(DecoderRunner, "LOGIT_ROWS", 4)
    with torch.no_grad():
        chunked = runner.token_logprobs(h, targets)  # 4 + 4 + 3 positions
    torch.testing.assert_close(chunked, whole.detach(), rtol=1e-6, atol=1e-6)
