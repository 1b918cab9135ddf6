"""`yapo-fast sae train` / `sae eval` on a tiny random Llama: sae-lens does the training, the result
loads with sae-lens and with yapo_fast, an interrupted run resumes from its checkpoint."""

import json

import pytest
import torch
from helpers import tiny_llama

from yapo_fast import load_sae
from yapo_fast.cli import main
from yapo_fast.data.text_source import TextMixture, detokenize, mixture_counts
from yapo_fast.errors import YapoFastError
from yapo_fast.sae.train import ActivationBatches, train_on_activations


def save_tiny_char_model(path):
    """tiny_llama + a character-level tokenizer (ASCII ids), so real text gives varied tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama()
    vocab = {chr(i): i for i in range(128)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=chr(0)))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=chr(3), pad_token=chr(3))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny JumpReLU run (corpus + chat with the model's own answers) and one TopK run that
    reuses its activation cache."""
    root = tmp_path_factory.mktemp("sae")
    save_tiny_char_model(root / "m")
    common = [
        "--model",
        str(root / "m"),
        "--layer",
        "1",
        "--tokens",
        "3000",
        "--batch-size",
        "128",
        "--ctx",
        "64",
        "--samples",
        "4000",
        "--lr",
        "1e-2",
        "--quiet",
        "--work-dir",
        str(root / "work"),
        "--dtype",
        "float32",
    ]
    assert (
        main(
            [
                "sae",
                "train",
                *common,
                "--kind",
                "jumprelu",
                "--width",
                "256",
                "--target-l0",
                "16",
                "--mix",
                "corpus=0.6,chat=0.4",
                "--out",
                str(root / "jr"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "sae",
                "train",
                *common,
                "--kind",
                "topk",
                "--width",
                "128",
                "--k",
                "8",
                "--mix",
                "corpus=0.6,chat=0.4",
                "--out",
                str(root / "tk"),
            ]
        )
        == 0
    )
    return root


@pytest.mark.parametrize("name,kind,width", [("jr", "jumprelu", 256), ("tk", "topk", 128)])
def test_trained_sae_loads_with_sae_lens_and_yapo_fast(trained, name, kind, width):
    from sae_lens import SAE as SaeLensSAE

    path = trained / name
    lensed = SaeLensSAE.load_from_disk(str(path))
    assert lensed.cfg.d_in == 64 and lensed.cfg.d_sae == width and lensed.cfg.architecture() == kind
    sae = load_sae(path)
    assert sae.kind == kind and sae.layer == 1 and sae.d_sae == width
    assert sae.metadata["text_mixture"] == "corpus=0.6,chat=0.4"
    assert sae.metadata["text_stats"]["tokens_by_source"]["chat"] > 0
    # the model's own answers (16 for a non-default model) are recorded with the file they came from
    assert sae.metadata["chat_answers"]["prompts_answered"] == 16
    assert sae.metadata["chat_answers"]["file"].endswith("chat_answers.jsonl")
    assert sae.metadata["train"]["seed"] == 0
    if kind == "topk":
        assert sae.k == 8
    # unit-norm decoder rows (JumpReLU folded by sae-lens; TopK trained so): a latent's value is the
    # length of its edit in the residual stream, the scale YaPO's learning rate assumes
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(width), rtol=0, atol=1e-4)
    assert sae.metadata["W_dec_rows_unit_norm"] is True
    # the same reconstruction from both loaders
    h = torch.randn(5, 64) + sae.b_dec
    ours = sae.decode(sae.encode(h))
    theirs = lensed.decode(lensed.encode(h))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_trained_sae_learned_something_and_eval_writes_json(trained, capsys):
    out = trained / "eval.json"
    rc = main(
        [
            "sae",
            "eval",
            "--sae",
            str(trained / "jr"),
            "--model",
            str(trained / "m"),
            "--tokens",
            "600",
            "--ctx",
            "64",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == res
    for key in ("variance_explained", "mean_l0", "dead_fraction", "loss_increase", "ce_clean", "ce_with_sae"):
        assert key in res
    # 31 steps on a random tiny model: far from converged, but clearly better than the mean
    # activation (which an untrained SAE, b_dec = mean, reproduces: variance explained ~0)
    assert res["variance_explained"] > 0.3, res
    assert 0 < res["mean_l0"] < 256 and 0 <= res["dead_fraction"] < 1
    assert res["tokens"] > 300


def test_topk_reused_the_activation_cache(trained):
    caches = sorted(p.name for p in (trained / "work" / "activations").iterdir())
    # both runs read one cache per text source (same model, layer, text)
    assert len(caches) == 2 and "-L1-chat-" in caches[0] and "-L1-corpus-" in caches[1], caches


def test_collect_only_fills_the_per_source_cache_that_training_reuses(trained, tmp_path, capsys):
    """A corpus-only --collect-only run caches a prefix of the corpus pool; a mixed run with a
    smaller corpus share then reads those chunks instead of running the model again."""
    acts = tmp_path / "acts"
    common = [
        "--model",
        str(trained / "m"),
        "--layer",
        "1",
        "--ctx",
        "64",
        "--work-dir",
        str(tmp_path / "w"),
        "--activations-dir",
        str(acts),
        "--batch-size",
        "64",
        "--quiet",
    ]
    assert (
        main(
            [
                "sae",
                "train",
                *common,
                "--mix",
                "corpus=1",
                "--tokens",
                "1500",
                "--collect-only",
                "--out",
                str(tmp_path / "never"),
            ]
        )
        == 0
    )
    assert not (tmp_path / "never").exists()  # collected, not trained
    (corpus_dir,) = acts.iterdir()
    stamps = {f.name: f.stat().st_mtime_ns for f in corpus_dir.iterdir()}
    assert (
        main(
            [
                "sae",
                "train",
                *common,
                "--mix",
                "corpus=0.5,chat=0.5",
                "--tokens",
                "1500",
                "--samples",
                "256",
                "--kind",
                "topk",
                "--k",
                "4",
                "--width",
                "32",
                "--threads",
                "1",
                "--dtype",
                "float32",
                "--out",
                str(tmp_path / "tk"),
            ]
        )
        == 0
    )
    assert {f.name: f.stat().st_mtime_ns for f in corpus_dir.iterdir() if f.name in stamps} == stamps
    assert len(list(acts.iterdir())) == 2  # + the chat cache
    meta = load_sae(tmp_path / "tk").metadata
    assert meta["text_mixture"] == "corpus=0.5,chat=0.5"
    used = meta["text_stats"]["tokens_by_source"]
    assert abs(used["corpus"] - used["chat"]) < 64 and used["corpus"] + used["chat"] >= 1500
    assert meta["train"]["aux_loss"] == 1.0 and meta["train"]["threads"] == 1


def test_mixture_takes_a_prefix_of_every_pool():
    pools = {"corpus": [[0] * 11] * 30, "chat": [[1] * 5] * 4}
    small, used_small = mixture_counts(pools, "corpus=0.7,chat=0.3", 60)
    big, used_big = mixture_counts(pools, "corpus=0.7,chat=0.3", 400)
    assert big[: len(small)] == small  # a larger budget extends a smaller one
    for order in (small, big):
        for src in pools:
            idx = [i for s, i in order if s == src]
            assert idx == list(range(len(idx)))  # a prefix of the pool, in pool order
    assert used_small == {"corpus": 50, "chat": 16} and sum(used_small.values()) >= 60
    assert used_big["chat"] == 16 and used_big["corpus"] == 300  # chat exhausted: the rest from corpus


def _interrupt_after(monkeypatch, n_batches):
    calls = {"n": 0}
    real = ActivationBatches.__next__

    def flaky(self):
        calls["n"] += 1
        if calls["n"] > n_batches:
            raise KeyboardInterrupt("simulated kill")
        return real(self)

    monkeypatch.setattr(ActivationBatches, "__next__", flaky)


@pytest.mark.parametrize("kind", ["jumprelu", "topk"])
def test_resume_continues_from_checkpoint_and_matches_uninterrupted(tmp_path, monkeypatch, kind):
    torch.manual_seed(0)
    acts = torch.randn(2048, 32) @ torch.randn(32, 32) + 2.0
    kw = dict(
        kind=kind,
        d_sae=96,
        k=6,
        target_l0=6,
        total_samples=64 * 24,
        batch_size=64,
        seed=3,
        checkpoint_every=64 * 6,
        metadata={"hook_name": "blocks.1.hook_resid_post"},
    )
    straight = train_on_activations(acts, checkpoint_dir=tmp_path / "a", **kw)

    with monkeypatch.context() as m:
        _interrupt_after(m, 15)  # dies in step 16; checkpoints were written after steps 7 and 13
        with pytest.raises(KeyboardInterrupt):
            train_on_activations(acts, checkpoint_dir=tmp_path / "b", **kw)
    state = json.loads((tmp_path / "b" / "latest" / "yapo_fast_resume.json").read_text())
    assert state["n_training_samples"] == 13 * 64 and state["n_training_steps"] == 13

    logs = []
    resumed = train_on_activations(acts, checkpoint_dir=tmp_path / "b", log=logs.append, **kw)
    assert logs and f"{state['n_training_samples']} of {kw['total_samples']} samples done" in logs[0]
    # it continued (not restarted): same batches, same optimizer state -> the same SAE
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(resumed, name), getattr(straight, name), rtol=1e-5, atol=1e-6)
    if kind == "jumprelu":
        torch.testing.assert_close(resumed.threshold, straight.threshold, rtol=1e-5, atol=1e-6)
    # a checkpoint of another run is refused, not silently resumed with the wrong schedule
    with pytest.raises(YapoFastError, match="belongs to another run"):
        train_on_activations(acts, checkpoint_dir=tmp_path / "b", **{**kw, "total_samples": 64 * 30})


def test_activation_batches_are_position_addressable():
    acts = torch.arange(50, dtype=torch.float32)[:, None]
    a = ActivationBatches(acts, 16, seed=1)
    seen = [next(a) for _ in range(7)]  # crosses epoch boundaries
    b = ActivationBatches(acts, 16, seed=1, position=3 * 16)
    torch.testing.assert_close(next(b), seen[3])
    first_epoch = torch.cat(seen)[:50].flatten().sort().values
    torch.testing.assert_close(first_epoch, acts.flatten())  # every row once per epoch


def test_bad_options_fail_clearly(tmp_path, capsys):
    save_tiny_char_model(tmp_path / "m")
    rc = main(["sae", "train", "--model", str(tmp_path / "m"), "--layer", "9", "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "out of range" in capsys.readouterr().err
    rc = main(
        [
            "sae",
            "train",
            "--model",
            str(tmp_path / "m"),
            "--layer",
            "1",
            "--mix",
            "books=1",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert rc == 2 and "unknown source 'books'" in capsys.readouterr().err
    rc = main(
        [
            "sae",
            "train",
            "--model",
            str(tmp_path / "m"),
            "--layer",
            "1",
            "--threads",
            "0",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert rc == 2 and "--threads 0" in capsys.readouterr().err
    with pytest.raises(YapoFastError, match="needs --k"):
        train_on_activations(torch.randn(256, 8), kind="topk", d_sae=16, total_samples=128, batch_size=64)
    assert not (tmp_path / "o").exists()


def test_text_mixture_and_detokenize():
    assert str(TextMixture.parse("corpus=0.7,chat=0.3")) == "corpus=0.7,chat=0.3"
    assert TextMixture.parse("chat=1").corpus == 0
    with pytest.raises(YapoFastError, match="at least one share"):
        TextMixture.parse("corpus=0,chat=0")
    assert detokenize("Hello , world ( yes ) ; it 's 1 @,@ 000 .") == "Hello, world (yes); it's 1,000."


def test_answers_command_writes_greedy_answers_and_resumes(trained, tmp_path):
    from yapo_fast.data.text_source import interleaved_chat_prompts, load_answers

    out = tmp_path / "answers.jsonl"
    cmd = [
        "sae",
        "answers",
        "--model",
        str(trained / "m"),
        "--split",
        "heldout",
        "--limit",
        "3",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(cmd) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == interleaved_chat_prompts("heldout")[:3]
    # a run killed after its first batch: the rerun keeps that answer and appends the rest
    out.write_text(out.read_text().splitlines(keepends=True)[0] + '{"prompt": "torn')
    assert main(cmd) == 0
    again = load_answers(out)
    assert list(again) == [r["prompt"] for r in rows] and again[rows[0]["prompt"]] == rows[0]["answer"]
    # greedy: the same answers again
    assert [again[r["prompt"]] for r in rows] == [r["answer"] for r in rows]
