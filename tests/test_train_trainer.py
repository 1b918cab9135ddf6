"""Runs of the trainer: resume after a kill, two processes (torch.distributed, gloo) equal one,
files written beside the output, CAA through train(), the CLI."""

import json

import pytest
import torch
import torch.multiprocessing as mp
from trainer_fixtures import KW, LAYER, ddp_worker, single_thread, tiny_pairs, tiny_setup  # noqa: F401 (autouse fixture)

import yapo_fast
from yapo_fast.errors import YapoFastError
from yapo_fast.vector import load_vector


class Killed(Exception):
    pass


def kill_at(step):
    def callback(rec):
        if rec["step"] == step:
            raise Killed(step)

    return callback


@pytest.mark.parametrize("method", ["yapo", "bipo"])
def test_a_killed_run_resumes_to_the_same_vector(tmp_path, method):
    model, tok, sae = tiny_setup("topk")
    pairs = tiny_pairs(5)  # 3 steps per epoch, 9 in all
    kw = dict(model=model, tokenizer=tok, sae=sae if method == "yapo" else None, **KW)
    full = yapo_fast.train(method, pairs, out=tmp_path / "full.safetensors", **kw)
    out = tmp_path / "killed.safetensors"
    with pytest.raises(Killed):  # killed after step 5: the last checkpoint is at step 4
        yapo_fast.train(method, pairs, out=out, checkpoint_every=2, callback=kill_at(5), **kw)
    resumed = yapo_fast.train(method, pairs, out=out, checkpoint_every=2, **kw)
    assert resumed.resumed_from == 4
    values = lambda r: r.vector.latent() if method == "yapo" else r.vector.dense()  # noqa: E731
    assert float(values(full).abs().max()) > 0
    assert torch.equal(values(resumed), values(full))
    # the loss log holds each step once, with the uninterrupted run's losses
    log = [json.loads(line) for line in (tmp_path / "killed.losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 10))
    assert [r["loss"] for r in log] == [r["loss"] for r in full.losses]
    # the vector after every epoch, and the final one, on disk
    for k in (1, 2, 3):
        assert load_vector(tmp_path / f"killed.epoch{k}.safetensors").info["epoch"] == k
    assert torch.equal(values(type(full)(vector=load_vector(out))), values(full))
    # a finished run is not trained again
    again = yapo_fast.train(method, pairs, out=out, **kw)
    assert again.resumed_from == 9 and torch.equal(values(again), values(full))


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    model, tok, sae = tiny_setup("relu")
    pairs = tiny_pairs(4)
    out = tmp_path / "v.safetensors"
    kw = dict(model=model, tokenizer=tok, **KW)
    yapo_fast.train("bipo", pairs, out=out, **kw)
    with pytest.raises(YapoFastError, match="different run"):
        yapo_fast.train("bipo", pairs, out=out, **{**kw, "lr": 1e-2})
    fresh = yapo_fast.train("bipo", pairs, out=out, resume=False, **{**kw, "lr": 1e-2})
    assert fresh.resumed_from == 0


def test_two_processes_equal_one(tmp_path):
    """torch.distributed with 2 CPU processes (gloo), 7 pairs in global batches of 4 (one rank gets
    3 or 1 pairs of a batch): the same losses and vector as one process."""
    result_file = tmp_path / "rank0.pt"
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), ["yapo", "bipo"], str(result_file)), nprocs=2, join=True)
    two = torch.load(result_file)
    model, tok, sae = tiny_setup("relu")
    for method in ("yapo", "bipo"):
        one = yapo_fast.train(
            method,
            tiny_pairs(7),
            model=model,
            tokenizer=tok,
            sae=sae if method == "yapo" else None,
            **{**KW, "batch_size": 4},
        )
        assert float(one.vector.values.abs().max()) > 0
        torch.testing.assert_close(two[method]["v"], one.vector.values, rtol=1e-5, atol=1e-6)
        for a, b in zip(two[method]["losses"], [r["loss"] for r in one.losses], strict=True):
            assert abs(a - b) <= 1e-5 * abs(b)


@pytest.mark.parametrize("reduce", ["mean", "last"])
def test_caa_through_train_is_the_mean_activation_difference(llama, reduce):
    from naive_trainer import ByteTokenizer

    from yapo_fast.chat import format_prompt, prompt_and_response_ids
    from yapo_fast.integrations.hf_hooks import capture_layer_output

    tok, pairs = ByteTokenizer(), tiny_pairs(3)
    res = yapo_fast.train("caa", pairs, model=llama, tokenizer=tok, layer=2, caa_reduce=reduce, progress=False)
    diffs = []
    for pair in pairs:
        acts = []
        for response in (pair.chosen, pair.rejected):
            p, r = prompt_and_response_ids(tok, format_prompt(tok, pair.prompt), response)
            with torch.no_grad(), capture_layer_output(llama, 2) as seen:
                llama(torch.tensor([p + r]))
            h = seen[0][0, len(p) :]
            acts.append(h.mean(0) if reduce == "mean" else h[-1])
        diffs.append(acts[0] - acts[1])
    assert res.vector.method == "caa" and res.vector.info["reduce"] == reduce
    torch.testing.assert_close(res.vector.dense(), torch.stack(diffs).mean(0), rtol=1e-5, atol=1e-6)


def test_cli_train_writes_a_vector_and_a_log(tmp_path, capsys):
    """`yapo-fast train` on the embedded default model (BiPO, 2 pairs, one step, a late layer)."""
    from yapo_fast.cli import main

    out = tmp_path / "bipo.safetensors"
    assert (
        main(["train", "--method", "bipo", "--pairs", "2", "--batch-size", "2", "--layer", "28", "--out", str(out)])
        == 0
    )
    vec = load_vector(out)
    assert vec.method == "bipo" and vec.layer == 28 and vec.d_model == 576
    assert len((tmp_path / "bipo.losses.jsonl").read_text().splitlines()) == 1
    assert "wrote" in capsys.readouterr().out
    assert (
        main(["train", "--method", "bipo", "--data", str(tmp_path / "missing.csv"), "--layer", "28", "--out", str(out)])
        == 2
    )


def test_caa_lean_path_equals_the_hook_path(llama):
    """CAA's layer-runner path (layers 0..L only, shared prompt, packed) equals forward hooks."""
    from naive_trainer import ByteTokenizer

    from yapo_fast.chat import format_prompt
    from yapo_fast.train.caa import response_activation

    tok, pairs = ByteTokenizer(), tiny_pairs(5)
    fast = yapo_fast.train("caa", pairs, model=llama, tokenizer=tok, layer=1, progress=False).vector.dense()
    slow = torch.stack(
        [
            response_activation(llama, tok, format_prompt(tok, p.prompt), p.chosen, 1, "mean")
            - response_activation(llama, tok, format_prompt(tok, p.prompt), p.rejected, 1, "mean")
            for p in pairs
        ]
    ).mean(0)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_holdout_split_and_early_stopping(tmp_path):
    model, tok, sae = tiny_setup("relu")
    pairs = tiny_pairs(8)  # 2 held out, 6 trained on: 3 steps per epoch
    kw = dict(model=model, tokenizer=tok, sae=sae, **{**KW, "epochs": 6, "lr": 0.2})
    full = yapo_fast.train("yapo", pairs, holdout=0.25, **kw)
    assert full.steps == 18 and len(full.losses) == 18 and not full.stopped_early
    assert [e["epoch"] for e in full.evals] == list(range(6)) and all(e["heldout_pairs"] == 2 for e in full.evals)
    out = tmp_path / "v.safetensors"
    early = yapo_fast.train("yapo", pairs, holdout=0.25, patience=1, out=out, **kw)
    accs = [e["heldout_accuracy"] for e in full.evals]
    # the rule: stop after the first epoch that does not beat the best so far
    stop = next((k for k in range(1, 6) if accs[k] <= max(accs[:k])), None)
    assert early.stopped_early == (stop is not None)
    assert len(early.evals) == (6 if stop is None else stop + 1)
    assert len(early.losses) == 3 * len(early.evals)
    again = yapo_fast.train("yapo", pairs, holdout=0.25, patience=1, out=out, **kw)  # a stopped run stays stopped
    assert torch.equal(again.vector.latent(), early.vector.latent()) and len(again.losses) == len(early.losses)
    with pytest.raises(YapoFastError, match="holdout"):
        yapo_fast.train("yapo", pairs, patience=2, **kw)
