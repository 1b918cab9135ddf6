"""explain: the activation index (streaming top-N per latent) returns the exact top contexts, for a
synthetic activation stream and for a latent planted to fire on one token of a real model; the
on-disk cache is keyed by the SAE and reused."""

import pytest
import torch
from helpers import tiny_llama

from yapo_fast import SAE
from yapo_fast.explain import activation_index as ai
from yapo_fast.integrations.hf_hooks import capture_layer_output

PLANTED = "Q"  # the token latent 5 is planted to fire on


def char_tokenizer():
    """A real (fast, HF) character-level tokenizer for the 128-token tiny models: id = code point."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, **{chr(i): i for i in range(2, 128)}}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>")


def planted_model_and_sae(layer: int = 1, latent: int = 5):
    """A tiny model whose embedding of PLANTED is 40x larger than the others, and a ReLU SAE whose
    latent `latent` reads that embedding's direction: it fires hardest exactly where PLANTED is."""
    model = tiny_llama(seed=3)
    emb = model.get_input_embeddings().weight
    emb[ord(PLANTED)] *= 40.0
    sae = SAE.random("relu", 64, 96, seed=2, layer=layer)
    direction = emb[ord(PLANTED)] / emb[ord(PLANTED)].norm()
    sae.W_enc[:, latent] = direction
    sae.b_enc[latent] = -1.0  # pre-activation: >= 5 on PLANTED, < 0.1 elsewhere: it fires on PLANTED only
    sae.b_dec.zero_()
    sae._hash = None
    return model, sae


DOCS = [
    ("plain", "the cat sat on the mat. Q is a rare letter; the quick brown fox. " * 6 + "Quite so, Q.", False),
    ("other", "no capital queue here, only lower-case letters and spaces and dots. " * 5, False),
    ("chat:x", "User: what is Q?\nAssistant: a letter.", True),
]


def test_topn_accumulator_matches_brute_force_on_a_stream():
    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(1000, 37, generator=g))  # continuous values: no ties
    acts[:, 3] = 0.0  # a dead latent
    for n, batch in ((5, 64), (20, 7), (3, 1000)):
        acc = ai.TopNAccumulator(37, n)
        for s in range(0, 1000, batch):
            acc.update(acts[s : s + batch], torch.arange(s, min(s + batch, 1000)))
        want_vals, want_pos = acts.T.topk(n, dim=1)
        live = torch.arange(37) != 3
        torch.testing.assert_close(acc.values[live], want_vals[live], atol=0, rtol=0)
        assert torch.equal(acc.positions[live], want_pos[live])
        assert torch.equal(acc.fired, (acts > 0).sum(0)) and acc.n_tokens == 1000
        torch.testing.assert_close(acc.sums, acts.double().sum(0))


def test_index_returns_the_planted_tokens_and_exact_activations():
    model, sae = planted_model_and_sae()
    tok = char_tokenizer()
    tokens, mask, sources = ai.token_sequences(tok, DOCS, seq_len=32, max_tokens=32 * 40)
    index = ai.build_activation_index(model, sae, 1, tokens, mask, sources, top_n=64, batch_size=5, progress=False)
    # Every Q not at position 0 of its row is in latent 5's top list, and nothing else is above them.
    planted = {(r, c) for r, c in zip(*torch.nonzero((tokens == ord(PLANTED)) & mask).T.tolist()) if c > 0}
    assert 5 <= len(planted) <= 64
    top = index.top(5)
    assert {(r, c) for _, r, c in top[: len(planted)]} == planted
    ctx = index.contexts(5, lambda i: tok.decode([i]), n=3, left=6, right=2)
    assert all(c["tokens"][c["highlight"]] == PLANTED for c in ctx)
    assert all(len(c["tokens"]) <= 9 for c in ctx) and ctx[0]["activation"] == top[0][0]
    # brute force: the full activation matrix from an ordinary forward pass
    with capture_layer_output(model, 1) as seen:
        model(input_ids=tokens, attention_mask=mask.long())
    z = sae.encode(seen[0])
    keep = mask.clone()
    keep[:, 0] = False
    z = torch.where(keep[..., None], z, torch.zeros(()))
    flat = z.reshape(-1, sae.d_sae)
    for latent in (5, 0, 17, 60):
        got = [v for v, _, _ in index.top(latent)]
        want = flat[:, latent].topk(64).values
        want = want[want > 0].tolist()
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    n = int(keep.sum())
    assert index.n_tokens == n
    torch.testing.assert_close(index.frequency, ((flat > 0).sum(0).double() / n).float())
    torch.testing.assert_close(index.mean_activation, (flat.double().sum(0) / n).float(), atol=1e-5, rtol=1e-5)


def test_index_cache_is_keyed_by_the_sae_and_reused(tmp_path, monkeypatch):
    model, sae = planted_model_and_sae()
    tok = char_tokenizer()
    kw = dict(docs=DOCS, top_n=8, seq_len=32, max_tokens=32 * 20, cache=tmp_path, progress=False)
    first, path = ai.load_or_build_index(model, tok, sae, 1, **kw)
    assert path.exists() and path.name.startswith(sae.weights_hash()) and not list(tmp_path.glob(".*tmp"))

    def no_rebuild(*a, **k):
        raise AssertionError("the cached index should have been loaded")

    monkeypatch.setattr(ai, "build_activation_index", no_rebuild)
    again, path2 = ai.load_or_build_index(model, tok, sae, 1, **kw)
    assert path2 == path and torch.equal(again.values, first.values) and torch.equal(again.positions, first.positions)
    assert again.sources == first.sources and again.n_tokens == first.n_tokens
    monkeypatch.undo()
    other = SAE.random("relu", 64, 96, seed=9, layer=1)
    _, path3 = ai.load_or_build_index(model, tok, other, 1, **kw)
    assert path3 != path and path3.name.startswith(other.weights_hash())
    path.write_bytes(b"garbage")  # a corrupt cache file is rebuilt, not trusted
    rebuilt, _ = ai.load_or_build_index(model, tok, sae, 1, **kw)
    assert torch.equal(rebuilt.values, first.values)


def test_token_sequences_and_detokenize():
    tok = char_tokenizer()
    docs = DOCS + [("chat:short", "Hi?", True)]
    tokens, mask, sources = ai.token_sequences(tok, docs, seq_len=16, max_tokens=16 * 30)
    assert tokens.shape == (30, 16) and sources.count("chat:x") == 1 and sources.count("chat:short") == 1
    assert {"plain", "other"} <= set(sources[:2])  # round-robin over plain documents
    long_row, short_row = sources.index("chat:x"), sources.index("chat:short")
    assert bool(mask[long_row].all()) and tok.decode(tokens[long_row].tolist()) == DOCS[2][1][:16]
    assert mask[short_row].tolist() == [True] * 3 + [False] * 13 and tokens[short_row, 3:].eq(1).all()
    text = "line one\nline two is longer\n\nthree\n" * 20
    assert ai._tokenize_long(tok, text, piece_chars=30) == tok(text, add_special_tokens=False)["input_ids"]
    assert (
        ai.detokenize("Hello , world ( big ) ; it 's 1 @-@ 2 and do n't .") == "Hello, world (big); it's 1-2 and don't."
    )
    with pytest.raises(ai.YapoFastError):
        ai.token_sequences(tok, DOCS, seq_len=16, max_tokens=8)


def test_default_documents_cover_every_source():
    from yapo_fast.data.pairs import BEHAVIOURS

    docs = ai.default_documents(char_tokenizer(), chat_per_behaviour=2)
    plain = [name for name, _, is_chat in docs if not is_chat]
    assert plain == ["carroll-alice", "tinyshakespeare-head", "wikitext-2-valid-head"]
    assert [name for name, _, is_chat in docs if is_chat] == [f"chat:{b}" for b in BEHAVIOURS] * 2
    assert " ," not in docs[2][1][:5000] and " ," in (ai.CORPUS_DIR / "wikitext-2-valid-head.txt").read_text()[:5000]
