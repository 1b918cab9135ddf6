"""BLEnD cultural items and pairs built from the shipped digest."""

import json

import pytest

from yapo_fast.cli import main
from yapo_fast.data import blend
from yapo_fast.errors import YapoFastError


@pytest.fixture(scope="module")
def digest():
    return blend.load_digest()


def test_non_localize_removes_the_country():
    assert (
        blend.non_localize("Spain", "¿Qué hacen las personas para celebrar Halloween en España?")
        == "¿Qué hacen las personas para celebrar Halloween?"
    )
    assert blend.non_localize("China", "在中国，感恩节的主菜是什么？") == "感恩节的主菜是什么？"
    assert (
        blend.non_localize("UK", "What is the main dish for Thanksgiving in the UK?")
        == "What is the main dish for Thanksgiving?"
    )
    assert "ایران" not in blend.non_localize("Iran", "غذای اصلی شکرگزاری درایران چیست؟")
    with pytest.raises(YapoFastError, match="no local-language name patterns"):
        blend.non_localize("Assam", "x")


@pytest.mark.parametrize("country", ["Spain", "China", "Iran"])
def test_mcq_items_are_well_formed(digest, country):
    loc = blend.mcq_items(country, "localized", digest=digest)
    non = blend.mcq_items(country, "non_localized", digest=digest)
    assert len(loc) > 150 and len(non) > 150
    for item in loc + non:
        assert len(item.options) == 4 and len(set(map(str.lower, item.options))) == 4
        row = digest[country][item.id]
        assert item.options["ABCD".index(item.answer)] == row["answer"]
        wrong = [o for i, o in enumerate(item.options) if "ABCD"[i] != item.answer]
        assert not set(map(str.lower, wrong)) & set(row["all_answers"])  # no distractor is right for the country
    assert all(country.replace("_", " ") in i.question or "the US" in i.question for i in loc[:20])
    assert {i.answer for i in loc} == set("ABCD")  # the answer position is shuffled
    train_ids = {qid for qid in digest[country] if blend._split_of(qid) == "train"}
    assert not train_ids & {i.id for i in loc}


def test_pairs_and_cli_files(tmp_path, digest):
    pairs = blend.preference_pairs("Spain", "non_localized", digest=digest)
    assert len(pairs) > 150 and all(p.chosen != p.rejected and "España" not in p.prompt for p in pairs)
    rc = main(["data", "--countries", "Spain", "--out", str(tmp_path)])
    assert rc == 0
    from yapo_fast.data.pairs import load_pairs

    loaded = load_pairs(tmp_path / "Spain_localized_pairs.jsonl")
    assert loaded == blend.preference_pairs("Spain", "localized", digest=digest)
    items = blend.load_mcq(tmp_path / "Spain_non_localized_mcq.jsonl")
    assert [i.answer for i in items] == [i.answer for i in blend.mcq_items("Spain", "non_localized", digest=digest)]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "options": ["a", "b"], "answer": "C"}) + "\n")
    with pytest.raises(YapoFastError, match="neither an option letter"):
        blend.load_mcq(tmp_path / "bad.jsonl")
    assert main(["data", "--countries", "Atlantis", "--out", str(tmp_path)]) == 2
