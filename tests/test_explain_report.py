"""explain(): end to end on a tiny model and SAE, for a planted YaPO vector and a dense vector; the
logit lens; the chosen/rejected statistics; the JSON / Markdown / HTML files; the CLI."""

import json

import pytest
import torch
from test_explain_activation_index import PLANTED, char_tokenizer, planted_model_and_sae

from yapo_fast import SteeringVector, YapoFastError, model_identity
from yapo_fast.explain import explain, write_report
from yapo_fast.explain.data_stats import chosen_rejected_stats
from yapo_fast.explain.logit_lens import logit_lens

EVIL = "<script>alert('x')</script>"
DOCS = [
    ("plain", ("the cat sat on the mat. Q is a rare letter; the quick brown fox. " * 4) + EVIL, False),
    ("other", "lower-case letters and spaces and dots and Q. " * 5, False),
    ("chat:x", "User: what is Q?\nAssistant: a letter.", True),
]


def write_pairs(path, n=6):
    rows = [
        {"prompt": f"question {i}?", "chosen": "Q Q Q yes" if i % 2 else "QQ sure", "rejected": "no, never."}
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def planted_vector(model, sae, data=None):
    latent = torch.zeros(sae.d_sae)
    latent[[5, 20, 33]] = torch.tensor([3.0, -2.0, 0.5])
    return SteeringVector.from_latent(
        latent, layer=1, sae=sae, model=model_identity(model), multiplier=2.0, info={"data": str(data)} if data else {}
    )


@pytest.fixture(scope="module")
def setup():
    model, sae = planted_model_and_sae()
    return model, char_tokenizer(), sae


def common(tmp_path):
    return dict(
        index_docs=DOCS,
        index_tokens=32 * 16,
        seq_len=32,
        cache=tmp_path / "cache",
        progress=False,
        contexts=4,
        lens_tokens=5,
    )


def test_explain_yapo_vector_end_to_end(setup, tmp_path):
    model, tok, sae = setup
    data = write_pairs(tmp_path / "pairs.jsonl")
    vec = planted_vector(model, sae, data)
    vec.save(tmp_path / "v.safetensors")
    r = explain(
        tmp_path / "v.safetensors", model=model, tokenizer=tok, sae=sae, top=3, out=tmp_path / "rep", **common(tmp_path)
    )
    k = r["ranking"]  # effects at m = 2: 6, 4, 1 (unit decoder rows)
    assert [e["latent"] for e in k["add"]] == [5, 33] and [e["latent"] for e in k["cap"]] == [20]
    assert k["total_effect"] == pytest.approx(11.0, rel=1e-5) and k["share_top10"] == pytest.approx(1.0)
    assert (k["entries_for_50"], k["entries_for_90"]) == (1, 2)  # 6/11 >= .5, 10/11 >= .9
    cards = r["features"]
    assert [c["latent"] for c in cards] == [5, 20, 33] and [c["role"] for c in cards] == ["add", "cap", "add"]
    assert cards[0]["contexts"] and all(c["tokens"][c["highlight"]] == PLANTED for c in cards[0]["contexts"])
    assert len(cards[0]["logit_lens"]["top"]) == 5 and len(cards[0]["logit_lens"]["bottom"]) == 5
    # the chosen responses contain Q (latent 5 fires), the rejected ones do not
    t = cards[0]["training"]
    assert t["chosen"]["frequency"] > 0.3 and t["rejected"]["frequency"] == 0.0 and t["chosen"]["mean"] > 0
    assert r["training_data"]["path"] == str(data) and r["training_data"]["pairs"] == 6
    files = r["files"]
    body = json.loads(open(files["json"], encoding="utf-8").read())
    assert body["ranking"] == json.loads(json.dumps(k)) and "files" not in body
    md = open(files["md"], encoding="utf-8").read()
    assert "latent 5" in md and "**[Q]**" in md and "share of the delta-norm bound" in md
    page = open(files["html"], encoding="utf-8").read()
    assert page.count('class="card"') == 3 and "<mark>Q</mark>" in page
    assert "<script" not in page
    # model and corpus text is escaped: plant markup in a context and in the logit lens
    body["features"][0]["contexts"][0]["tokens"][0] = EVIL
    body["features"][0]["logit_lens"]["top"][0]["token"] = "</div><b>"
    from yapo_fast.explain.report_html import render_html

    evil = render_html(body)
    assert "<script" not in evil and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in evil
    assert "&lt;/div&gt;&lt;b&gt;" in evil and evil.count("<div") == page.count("<div")
    assert "http://" not in page and "https://" not in page and "<link" not in page  # self-contained


def test_explain_dense_vector_projects_onto_the_decoder(setup, tmp_path):
    model, tok, sae = setup
    v = 2.0 * sae.W_dec[7] + 1.0 * sae.W_dec[42]
    vec = SteeringVector.from_dense(v, method="caa", layer=1, model=model_identity(model))
    r = explain(vec, model=model, tokenizer=tok, sae=sae, top=4, **common(tmp_path))
    p = r["projection"]
    assert p["top_aligned"][0]["latent"] == 7 and p["features_for_90"] is not None
    assert [c["latent"] for c in r["features"]] == [a["latent"] for a in p["top_aligned"][:4]]
    assert r["training_data"]["path"] is None and "records no training data" in r["training_data"]["note"]
    assert r["features"][0]["training"] is None
    assert "files" not in r
    paths = write_report(r, tmp_path / "dense")
    assert "Top aligned SAE features" in paths["html"].read_text(encoding="utf-8")


def test_explain_refuses_mismatches_with_clear_errors(setup, tmp_path):
    model, tok, sae = setup
    vec = planted_vector(model, sae)
    other = planted_model_and_sae(layer=2)[1]
    with pytest.raises(YapoFastError, match="SAE"):
        explain(vec, model=model, tokenizer=tok, sae=other, **common(tmp_path))
    with pytest.raises(YapoFastError, match="tokenizer"):
        explain(vec, model=model, sae=sae, **common(tmp_path))
    with pytest.raises(YapoFastError, match="does not exist"):
        explain(vec, model=model, tokenizer=tok, sae=sae, data=tmp_path / "nope.csv", **common(tmp_path))


def test_logit_lens_reads_a_planted_direction(setup):
    model, _, _ = setup
    W_U = model.get_output_embeddings().weight
    target = 77
    d = W_U[target] * 5.0  # its own unembedding row: the top token, by a margin, for a random W_U
    lens = logit_lens(model, torch.stack([d, -d]), k=3)
    want = model.lm_head(model.model.norm(d))
    assert lens[0]["top"][0][0] == target == int(want.argmax())
    assert lens[0]["bottom"][0][0] == int(want.argmin())
    assert lens[1]["bottom"][0][0] == target  # the opposite direction suppresses it
    assert lens[0]["top"][0][1] == pytest.approx(float(want.max()), rel=1e-5)


def test_chosen_rejected_stats_count_response_tokens_only(setup):
    model, tok, sae = setup
    from yapo_fast.data.pairs import PreferencePair

    pairs = [PreferencePair("Q Q Q Q?", "QQ", "ab")]  # Q in the prompt must not count
    s = chosen_rejected_stats(model, tok, sae, 1, pairs, [5], progress=False)
    assert s["chosen"]["tokens"] == 2 and s["rejected"]["tokens"] == 2
    assert s["chosen"]["frequency"] == [1.0] and s["rejected"]["frequency"] == [0.0]


def test_cli_explain_writes_the_three_files(setup, tmp_path, capsys, monkeypatch):
    from yapo_fast.cli import main
    from yapo_fast.explain import activation_index
    from yapo_fast.integrations.sae_lens_loading import save_sae

    model, tok, sae = setup
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    save_sae(sae, tmp_path / "sae")
    vec = planted_vector(model, sae, write_pairs(tmp_path / "pairs.jsonl"))
    vec.save(tmp_path / "v.safetensors")
    # the shipped corpus is large for a tiny model: index the test documents instead
    monkeypatch.setattr(activation_index, "default_documents", lambda tokenizer: DOCS)
    rc = main(
        [
            "explain",
            str(tmp_path / "v.safetensors"),
            "--model",
            str(tmp_path / "m"),
            "--sae",
            str(tmp_path / "sae"),
            "--top",
            "2",
            "--index-tokens",
            "1024",
            "--cache",
            str(tmp_path / "c"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "3 entries (2 add, 1 cap)" in out and "latent 5" in out
    for name in ("report.html", "report.md", "report.json"):
        assert (tmp_path / "v-explain" / name).is_file()
    # two vectors: a report each and the side-by-side comparison
    dense = SteeringVector.from_dense(
        2.0 * sae.W_dec[5] + sae.W_dec[8], method="caa", layer=1, model=model_identity(model)
    )
    dense.save(tmp_path / "caa.safetensors")
    rc = main(
        [
            "explain",
            str(tmp_path / "v.safetensors"),
            str(tmp_path / "caa.safetensors"),
            "--model",
            str(tmp_path / "m"),
            "--sae",
            str(tmp_path / "sae"),
            "--top",
            "2",
            "--index-tokens",
            "1024",
            "--cache",
            str(tmp_path / "c"),
            "--out",
            str(tmp_path / "both"),
        ]
    )
    assert rc == 0 and "wrote" in capsys.readouterr().out
    comp = json.loads((tmp_path / "both" / "compare.json").read_text())
    assert [r["name"] for r in comp["rows"]] == ["v", "caa"] and comp["rows"][0]["top"] == [5, 20, 33]
    assert comp["rows"][1]["top"][0] == 5 and comp["overlap"]["v"]["caa"] >= 1 and comp["overlap"]["v"]["v"] == 3
    assert (tmp_path / "both" / "caa" / "report.html").is_file() and (tmp_path / "both" / "compare.html").is_file()
    rc = main(
        [
            "explain",
            str(tmp_path / "missing.safetensors"),
            "--model",
            str(tmp_path / "m"),
            "--sae",
            str(tmp_path / "sae"),
        ]
    )
    assert rc == 2 and "no steering vector file" in capsys.readouterr().err


def test_batched_stats_equal_one_pair_at_a_time(setup):
    model, tok, sae = setup
    from yapo_fast.data.pairs import PreferencePair

    pairs = [PreferencePair(f"question {'Q' * i}?", "Q yes " * (i + 1), "n" * (3 * i + 1)) for i in range(5)]
    latents = [5, 0, 17, 60, 91]
    batched = chosen_rejected_stats(model, tok, sae, 1, pairs, latents, batch_size=3, progress=False)
    single = [chosen_rejected_stats(model, tok, sae, 1, [p], latents, batch_size=1, progress=False) for p in pairs]
    for side in ("chosen", "rejected"):
        n = sum(s[side]["tokens"] for s in single)
        assert batched[side]["tokens"] == n
        for j in range(len(latents)):
            want_mean = sum(s[side]["mean"][j] * s[side]["tokens"] for s in single) / n
            want_freq = sum(s[side]["frequency"][j] * s[side]["tokens"] for s in single) / n
            assert batched[side]["mean"][j] == pytest.approx(want_mean, rel=1e-4, abs=1e-6)
            assert batched[side]["frequency"][j] == pytest.approx(want_freq, abs=1e-9)
