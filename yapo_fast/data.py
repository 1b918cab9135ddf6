"""Preference data: (prompt, chosen, rejected) triples from the formats users bring."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import YapoFastError

DATA_DIR = Path(__file__).parent / "assets" / "data"
BEHAVIOURS = ("hallucination", "jailbreak", "power-seeking", "wealth-seeking")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str  # the behaviour to add (BiPO's "matching")
    rejected: str


def bipo_csv_path(behaviour: str, split: str = "train") -> Path:
    if behaviour not in BEHAVIOURS:
        raise YapoFastError(f"unknown behaviour {behaviour!r}; shipped: {BEHAVIOURS}")
    return DATA_DIR / "bipo" / behaviour / f"{split}.csv"


def load_pairs(path: str | Path, limit: int | None = None) -> list[PreferencePair]:
    """BiPO CSV (question, matching, not_matching) or JSONL (prompt, chosen, rejected)."""
    path = Path(path)
    if not path.is_file():
        raise YapoFastError(f"no preference data at {path}")
    pairs: list[PreferencePair] = []
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    pairs.append(_pair(row["prompt"], row["chosen"], row["rejected"], path, line_no))
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise YapoFastError(f"{path}:{line_no}: expected a JSON object with string fields "
                                        f"prompt, chosen, rejected ({type(exc).__name__}: {exc})") from exc
                if limit and len(pairs) >= limit:
                    break
        return pairs
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"question", "matching", "not_matching"} - set(reader.fieldnames or [])
        if missing:
            raise YapoFastError(f"{path}: CSV lacks column(s) {sorted(missing)}; expected question, matching, "
                                "not_matching (BiPO format) or a .jsonl file with prompt, chosen, rejected")
        for line_no, row in enumerate(reader, 2):
            pairs.append(_pair(row["question"], row["matching"], row["not_matching"], path, line_no))
            if limit and len(pairs) >= limit:
                break
    return pairs


def _pair(prompt, chosen, rejected, path, line_no) -> PreferencePair:
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str) or not value.strip():
            raise YapoFastError(f"{path}:{line_no}: empty or missing {name}")
    return PreferencePair(prompt, chosen, rejected)
