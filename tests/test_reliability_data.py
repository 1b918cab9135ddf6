"""Reliability (issue 8), data: every kind of malformed CSV / JSONL row gives a YapoFastError naming
the file and the line, or, under the explicit flag (skip_bad_rows=True, --skip-bad-rows), is left
out and counted; good rows around bad ones are never lost or shifted."""

import csv
import json

import pytest

from yapo_fast import YapoFastError
from yapo_fast.cli import main
from yapo_fast.data.pairs import MAX_FIELD_CHARS, load_pairs

GOOD = [("What is 2+2?", "4", "5"), ("Name a colour.", "blue", "a rock"), ("Say hi.", "hi", "no")]
HUGE = "x" * (MAX_FIELD_CHARS + 1)
CSV_HUGE = "y" * 200_000  # beyond csv's own field limit (131072): the csv module itself errors


def _csv_bytes(rows) -> bytes:
    """rows: tuples of str (a well-formed row) or raw bytes (a line written as is)."""
    out = [b"question,matching,not_matching\n"]
    for row in rows:
        if isinstance(row, bytes):
            out.append(row + b"\n")
        else:
            out.append(",".join('"' + c.replace('"', '""') + '"' for c in row).encode() + b"\n")
    return b"".join(out)


# (name, CSV line, reason pattern); each is placed between good rows
CSV_BAD = [
    ("missing column", b'"only a question","and one answer"', "missing rejected"),
    ("empty answer", b'"a question","","no"', "empty chosen"),
    ("blank answer", b'"a question","yes","   "', "empty rejected"),
    ("bad encoding", b'"caf\xe9 ?","yes","no"', "prompt is not valid UTF-8"),
    ("huge field", f'"{HUGE}","yes","no"'.encode(), "prompt of 100001 characters"),
    ("field over csv's limit", f'"q","{CSV_HUGE}","no"'.encode(), "unreadable CSV row|chosen of 200000"),
]

JSONL_BAD = [
    ("not JSON", b'{"prompt": "q", "chosen": "a",', "not valid JSON"),
    ("not an object", b'["q", "a", "b"]', "expected a JSON object"),
    ("missing key", b'{"prompt": "q", "chosen": "a"}', "missing rejected"),
    ("empty answer", b'{"prompt": "q", "chosen": "", "rejected": "b"}', "empty chosen"),
    ("number answer", b'{"prompt": "q", "chosen": 4, "rejected": "b"}', "chosen must be text, got int"),
    ("null prompt", b'{"prompt": null, "chosen": "a", "rejected": "b"}', "missing prompt"),
    ("list answer", b'{"prompt": "q", "chosen": ["a"], "rejected": "b"}', "chosen must be text, got list"),
    ("bad encoding", b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "prompt is not valid UTF-8"),
    ("huge row", json.dumps({"prompt": "q", "chosen": "a", "rejected": HUGE * 3}).encode(), "row of .* characters"),
    ("huge field", json.dumps({"prompt": "q", "chosen": HUGE, "rejected": "b"}).encode(), "chosen of 100001"),
]


def _jsonl_bytes(rows) -> bytes:
    lines = [
        r if isinstance(r, bytes) else json.dumps(dict(zip(("prompt", "chosen", "rejected"), r))).encode() for r in rows
    ]
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("name,line,match", CSV_BAD, ids=[c[0] for c in CSV_BAD])
def test_bad_csv_row_is_named_by_file_and_line_or_skipped(tmp_path, name, line, match):
    path = tmp_path / "pairs.csv"
    path.write_bytes(_csv_bytes([GOOD[0], GOOD[1], line, GOOD[2]]))  # the bad row is on line 4
    with pytest.raises(YapoFastError, match=rf"pairs.csv:4: ({match}).*--skip-bad-rows"):
        load_pairs(path)
    pairs = load_pairs(path, skip_bad_rows=True)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == GOOD
    assert len(pairs.skipped) == 1 and pairs.skipped[0][0] == 4


@pytest.mark.parametrize("name,line,match", JSONL_BAD, ids=[c[0] for c in JSONL_BAD])
def test_bad_jsonl_row_is_named_by_file_and_line_or_skipped(tmp_path, name, line, match):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(_jsonl_bytes([GOOD[0], line, GOOD[1], GOOD[2]]))  # line 2
    with pytest.raises(YapoFastError, match=rf"pairs.jsonl:2: {match}"):
        load_pairs(path)
    pairs = load_pairs(path, skip_bad_rows=True)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == GOOD
    assert [n for n, _ in pairs.skipped] == [2]


def test_multiline_csv_records_keep_their_line_numbers(tmp_path):
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "matching", "not_matching"])
        w.writerow(["a question\nover\nthree lines", "yes", "no"])  # lines 2-4
        w.writerow(["q", "", "no"])  # line 5
    with pytest.raises(YapoFastError, match="pairs.csv:5: empty chosen"):
        load_pairs(path)


def test_all_bad_rows_together_are_counted_and_the_good_kept(tmp_path):
    rows = []
    for i, (_, line, _) in enumerate(JSONL_BAD):
        rows += [GOOD[i % 3], line]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(_jsonl_bytes(rows))
    pairs = load_pairs(path, skip_bad_rows=True)
    assert len(pairs) == len(JSONL_BAD) and len(pairs.skipped) == len(JSONL_BAD)
    assert [n for n, _ in pairs.skipped] == list(range(2, 2 * len(JSONL_BAD) + 1, 2))
    # limit counts good pairs only
    assert len(load_pairs(path, limit=2, skip_bad_rows=True)) == 2


def test_whole_file_problems_are_never_skipped(tmp_path):
    (tmp_path / "cols.csv").write_text("question,answer\nq,a\n")
    with pytest.raises(YapoFastError, match="lacks column"):
        load_pairs(tmp_path / "cols.csv", skip_bad_rows=True)
    with pytest.raises(YapoFastError, match="no preference data"):
        load_pairs(tmp_path / "missing.jsonl", skip_bad_rows=True)


def test_cli_flag_skips_and_reports_the_count(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(_jsonl_bytes([GOOD[0], JSONL_BAD[0][1], GOOD[1], JSONL_BAD[3][1], GOOD[2]]))
    out = tmp_path / "v.safetensors"
    # without the flag: the first bad row stops the command before any model is loaded
    assert main(["train", "--method", "caa", "--data", str(path), "--layer", "1", "--out", str(out)]) == 2
    assert "pairs.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main(["train", "--data", str(path), "--method", "bipo", "--multiplier", "1e9", "--out", str(out)]) == 2
    assert "pairs.jsonl:2" in capsys.readouterr().err  # the data is read (and refused) first
    # with the flag: the bad rows are counted and named, then the run goes on (to the multiplier check)
    assert (
        main(
            [
                "train",
                "--data",
                str(path),
                "--skip-bad-rows",
                "--method",
                "bipo",
                "--multiplier",
                "1e9",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "skipped 2 bad row(s) of" in err and "line 2: not valid JSON" in err and "line 4: empty chosen" in err
    assert "outside the supported range" in err and not out.exists()
