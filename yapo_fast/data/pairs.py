"""Preference data: (prompt, chosen, rejected) triples from the formats users bring."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from yapo_fast.errors import YapoFastError

DATA_DIR = Path(__file__).resolve().parents[1] / "assets" / "data"
BEHAVIOURS = ("hallucination", "jailbreak", "power-seeking", "wealth-seeking")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str  # the behaviour to add (BiPO's "matching")
    rejected: str


# Behaviours with on-policy pairs built from the default model's own answers (behaviour_data.py):
# the ones a 135M model visibly changes in free generation.
ADDED_BEHAVIOURS = ("spanish", "positive-tone")


def behaviour_path(behaviour: str, split: str = "train") -> Path:
    """The shipped preference pairs of a behaviour: BiPO's CSV or an added behaviour's JSONL."""
    if behaviour in ADDED_BEHAVIOURS:
        return DATA_DIR / "behaviours" / behaviour / f"{split}.jsonl"
    if behaviour in BEHAVIOURS:
        return bipo_csv_path(behaviour, split)
    raise YapoFastError(f"unknown behaviour {behaviour!r}; shipped: {BEHAVIOURS + ADDED_BEHAVIOURS}")


def bipo_csv_path(behaviour: str, split: str = "train") -> Path:
    if behaviour not in BEHAVIOURS:
        raise YapoFastError(f"unknown behaviour {behaviour!r}; shipped: {BEHAVIOURS}")
    return DATA_DIR / "bipo" / behaviour / f"{split}.csv"


MAX_FIELD_CHARS = 100_000  # a prompt or response longer than this is a broken row, not a preference pair


class Pairs(list):
    """The pairs of a file (a plain list) and, under skip_bad_rows, the rows left out:
    ``skipped`` = [(line, reason), ...]."""

    def __init__(self, pairs=(), skipped=()):
        super().__init__(pairs)
        self.skipped: list[tuple[int, str]] = list(skipped)


def load_pairs(path: str | Path, limit: int | None = None, *, skip_bad_rows: bool = False) -> Pairs:
    """BiPO CSV (question, matching, not_matching) or JSONL (prompt, chosen, rejected).

    A malformed row (missing field, empty or non-text answer, invalid UTF-8, a field over
    MAX_FIELD_CHARS characters, a JSONL line that is not an object) raises a YapoFastError naming
    the file and line; with skip_bad_rows=True it is left out and recorded in ``.skipped`` instead.
    A file that is unusable as a whole (no such file, missing CSV columns) always raises."""
    path = Path(path)
    if not path.is_file():
        raise YapoFastError(f"no preference data at {path}")
    pairs = Pairs()

    def bad(line_no: int, reason: str) -> None:
        if not skip_bad_rows:
            raise YapoFastError(
                f"{path}:{line_no}: {reason} (fix the row, or pass --skip-bad-rows / "
                "skip_bad_rows=True to leave such rows out and count them)"
            )
        pairs.skipped.append((line_no, reason))

    # surrogateescape: an invalid byte becomes a lone surrogate in that row only, so the row (and
    # its line) is named instead of the whole file failing at some buffer boundary
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as f:
        if path.suffix == ".jsonl":
            rows = _jsonl_rows(f)
        else:
            reader = csv.DictReader(f)
            missing = {"question", "matching", "not_matching"} - set(reader.fieldnames or [])
            if missing:
                raise YapoFastError(
                    f"{path}: CSV lacks column(s) {sorted(missing)}; expected question, matching, "
                    "not_matching (BiPO format) or a .jsonl file with prompt, chosen, rejected"
                )
            rows = _csv_rows(reader)
        for line_no, row in rows:
            if isinstance(row, str):  # the row could not be parsed: row is the reason
                bad(line_no, row)
                continue
            reason = _row_problem(row)
            if reason:
                bad(line_no, reason)
                continue
            pairs.append(PreferencePair(*row))
            if limit and len(pairs) >= limit:
                break
    return pairs


def report_skipped(pairs: "Pairs", path) -> None:
    """Say on stderr how many bad rows --skip-bad-rows left out, and the first few."""
    import sys

    skipped = getattr(pairs, "skipped", [])
    if skipped:
        first = "; ".join(f"line {n}: {why}" for n, why in skipped[:3])
        print(
            f"yapo-fast: skipped {len(skipped)} bad row(s) of {path} ({first}{'; ...' if len(skipped) > 3 else ''})",
            file=sys.stderr,
        )


def _jsonl_rows(f):
    for line_no, line in enumerate(f, 1):
        if not line.strip():
            continue
        if len(line) > 3 * MAX_FIELD_CHARS:
            yield line_no, f"row of {len(line)} characters, longer than any preference pair"
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield line_no, f"not valid JSON ({exc.msg})"
            continue
        if not isinstance(row, dict):
            yield line_no, f"expected a JSON object with fields prompt, chosen, rejected, got {type(row).__name__}"
            continue
        yield line_no, (row.get("prompt"), row.get("chosen"), row.get("rejected"))


def _csv_rows(reader):
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. a field over csv's own size limit; the reader goes on after it
            yield reader.reader.line_num, f"unreadable CSV row ({exc})"  # DictReader's own count lags on errors
            continue
        yield reader.line_num, (row.get("question"), row.get("matching"), row.get("not_matching"))


def _row_problem(row) -> str | None:
    for name, value in zip(("prompt", "chosen", "rejected"), row):
        if value is None:
            return f"missing {name}"
        if not isinstance(value, str):
            return f"{name} must be text, got {type(value).__name__}"
        if not value.strip():
            return f"empty {name}"
        if len(value) > MAX_FIELD_CHARS:
            return f"{name} of {len(value)} characters (at most {MAX_FIELD_CHARS})"
        if any("\udc80" <= c <= "\udcff" for c in value):
            return f"{name} is not valid UTF-8 text (bad bytes in the file)"
    return None
