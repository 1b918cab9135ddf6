"""BLEnD cultural data: multiple-choice items and preference pairs per country.

Source: BLEnD (github nlee0212/BLEnD, `data/`, CC BY-SA 4.0): 500 everyday-culture questions asked
in 16 countries/regions, each answered by several annotators. yapo-fast ships a compact digest
(yapo_fast/assets/data/blend/blend_digest.jsonl, built by `yapo-fast data --blend-raw DIR`): per
country and question ID the English question, the local-language question, the most-voted English
answer and every English answer any annotator gave.

From the digest, for a country C and a question ID:
- the correct option is C's most-voted English answer;
- the distractors are the other countries' most-voted English answers for the same ID, dropping
  duplicates and anything one of C's annotators also answered (those are not wrong for C);
- **localized**: the English question, which names the country ("... in Spain?");
- **non-localized**: the local-language question with the country's name (and its preposition)
  removed, so the language is the only cue (for English-speaking countries no cue is left: their
  non-localized accuracy is the model's default culture).
Items whose country name cannot be removed are left out of the non-localized set (counted).

Preference pairs (training data for a country's vector): prompt = the question (localized or
non-localized, no options), chosen = C's answer, rejected = another country's answer. Questions are
split by a hash of their ID into train (pairs) and test (MCQ) so that no evaluated question is
trained on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from yapo_fast.errors import YapoFastError

BLEND_DIR = Path(__file__).resolve().parents[1] / "assets" / "data" / "blend"
DIGEST = BLEND_DIR / "blend_digest.jsonl"
LETTERS = "ABCD"

# The country's name as the local-language questions write it, with the preposition that goes with
# it: removed (longest pattern first) to build the non-localized question. Countries not listed here
# get no non-localized items (an error says so).
_LOCAL_NAME_PATTERNS: dict[str, list[str]] = {
    "Spain": [r"\s*\b(en|de) (la )?España\b", r"\bEspaña\b", r"\bespañol(es|as|a)?\b"],
    "Mexico": [r"\s*\b(en|de) México\b", r"\bMéxico\b", r"\bmexican(os|as|o|a)\b"],
    "China": [r"在中国[，,的]?", r"中国(人)?的?"],
    "Iran": [r"\s*در\s*ایران", r"ایرانی(ان)?", r"ایران"],
    "Greece": [r"\s*στην Ελλάδα", r"της Ελλάδας", r"Ελλάδα", r"Έλληνες", r"ελληνικ\w*"],
    "South_Korea": [
        r"대한민국에서는\s*",
        r"대한민국에서\s*",
        r"대한민국의\s*",
        r"대한민국\s*",
        r"한국에서는\s*",
        r"한국에서\s*",
        r"한국의\s*",
        r"한국\s*",
    ],
    "Indonesia": [r"\s*\bdi Indonesia\b", r"\bIndonesia\b"],
    "UK": [r"\s*\bin the UK\b", r"\s*\bthe UK\b", r"\bUK\b", r"\bBritish\b"],
    "US": [r"\s*\bin the US\b", r"\s*\bthe US\b", r"\bUS\b", r"\bAmerican(s)?\b"],
}
# After removal none of these may remain (else the item is dropped from the non-localized set).
_LOCAL_NAME_CHECK: dict[str, str] = {
    "Spain": r"España",
    "Mexico": r"México",
    "China": r"中国",
    "Iran": r"ایران",
    "Greece": r"Ελλάδ|Έλλην",
    "South_Korea": r"한국",
    "Indonesia": r"Indonesia",
    "UK": r"\bUK\b|Brit",
    "US": r"\bUS\b|America",
}


@dataclass(frozen=True)
class MCQItem:
    question: str
    options: list[str]
    answer: str  # a letter, "A".."D"
    id: str = ""
    country: str = ""
    setting: str = ""  # "localized" | "non_localized"


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower().rstrip("."))


def _split_of(qid: str, test_fraction: float = 0.5) -> str:
    h = int(hashlib.sha256(qid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test_fraction else "train"


# ---- the shipped digest -----------------------------------------------------------------------
def build_digest(raw_dir: str | Path, out: str | Path = DIGEST) -> Path:
    """Digest BLEnD's questions/ and annotations/ (the repository's data/ folder) into one JSONL."""
    from yapo_fast.atomic import atomic_path

    raw = Path(raw_dir)
    if not (raw / "annotations").is_dir() or not (raw / "questions").is_dir():
        raise YapoFastError(f"{raw} is not BLEnD's data folder (expected annotations/ and questions/ in it)")
    rows = []
    for ann_path in sorted((raw / "annotations").glob("*_data.json")):
        country = ann_path.name[: -len("_data.json")]
        q_path = raw / "questions" / f"{country}_questions.csv"
        local_q = {}
        if q_path.is_file():
            with q_path.open(encoding="utf-8", newline="") as f:
                local_q = {r["ID"]: r["Question"] for r in csv.DictReader(f)}
        data = json.loads(ann_path.read_text(encoding="utf-8"))
        for qid, entry in data.items():
            anns = [a for a in entry.get("annotations", []) if a.get("en_answers")]
            if not anns:
                continue
            top = max(anns, key=lambda a: a.get("count", 0))  # first of the most-voted on ties
            rows.append(
                {
                    "country": country,
                    "id": qid,
                    "en_question": entry["en_question"],
                    "local_question": local_q.get(qid, entry.get("question", "")),
                    "answer": top["en_answers"][0],
                    "votes": int(top.get("count", 0)),
                    "all_answers": sorted({_norm(x) for a in anns for x in a["en_answers"]}),
                }
            )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return out


def load_digest(path: str | Path = DIGEST) -> dict[str, dict[str, dict]]:
    """{country: {question id: row}}."""
    path = Path(path)
    if not path.is_file():
        raise YapoFastError(
            f"no BLEnD digest at {path}: build it with `yapo-fast data --blend-raw <BLEnD data folder>`"
        )
    out: dict[str, dict[str, dict]] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out.setdefault(r["country"], {})[r["id"]] = r
    return out


def countries(digest: dict | None = None) -> list[str]:
    return sorted(digest or load_digest())


def non_localize(country: str, question: str) -> str | None:
    """The local-language question with the country's name removed, or None where it cannot be."""
    if country not in _LOCAL_NAME_PATTERNS:
        raise YapoFastError(
            f"no local-language name patterns for {country!r}: non-localized items exist for "
            f"{sorted(_LOCAL_NAME_PATTERNS)}"
        )
    text = question
    for pat in _LOCAL_NAME_PATTERNS[country]:
        text = re.sub(pat, "", text)
    text = re.sub(r"\s+([?？;;,，.])", r"\1", re.sub(r"\s{2,}", " ", text)).strip(" ,，")
    if re.search(_LOCAL_NAME_CHECK[country], text) or len(text) < 5:
        return None
    return text


def _distractors(digest, country: str, qid: str) -> list[str]:
    mine = digest[country][qid]
    taken = set(mine["all_answers"]) | {_norm(mine["answer"])}
    out = []
    for other in sorted(digest):
        row = digest[other].get(qid)
        if other == country or row is None:
            continue
        if _norm(row["answer"]) not in taken:
            taken.add(_norm(row["answer"]))
            out.append(row["answer"])
    return out


def _question(row, country: str, setting: str) -> str | None:
    if setting == "localized":
        return row["en_question"]
    if setting == "non_localized":
        return non_localize(country, row["local_question"])
    raise YapoFastError(f"setting must be 'localized' or 'non_localized', got {setting!r}")


def _check_country(digest, country):
    if country not in digest:
        raise YapoFastError(f"unknown BLEnD country {country!r}; known: {sorted(digest)}")


def _candidates(country: str, setting: str, split: str, digest: dict):
    """(question id, digest row, question text, distractors) for each of the country's questions in
    `split` that can be asked in `setting` and has at least one distractor: the one walk behind
    both the MCQ items and the preference pairs, so they always draw from the same questions."""
    _check_country(digest, country)
    for qid in sorted(digest[country]):
        if split != "all" and _split_of(qid) != split:
            continue
        row = digest[country][qid]
        question = _question(row, country, setting)
        if question is None:
            continue
        wrong = _distractors(digest, country, qid)
        if wrong:
            yield qid, row, question, wrong


def mcq_items(
    country: str,
    setting: str = "localized",
    *,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    digest: dict | None = None,
) -> list[MCQItem]:
    """4-option cultural multiple-choice items for `country` (answer position shuffled by seed)."""
    items = []
    for qid, row, question, wrong in _candidates(country, setting, split, digest or load_digest()):
        if len(wrong) < 3:
            continue
        rng = random.Random(f"{seed}:{country}:{qid}")
        options = rng.sample(wrong, 3) + [row["answer"]]
        rng.shuffle(options)
        items.append(
            MCQItem(
                question=question,
                options=options,
                answer=LETTERS[options.index(row["answer"])],
                id=qid,
                country=country,
                setting=setting,
            )
        )
        if limit and len(items) >= limit:
            break
    return items


def preference_pairs(
    country: str,
    setting: str = "localized",
    *,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    digest: dict | None = None,
):
    """Cultural preference pairs: chosen = the country's answer, rejected = another country's answer."""
    from yapo_fast.data.pairs import PreferencePair

    pairs = []
    for qid, row, question, wrong in _candidates(country, setting, split, digest or load_digest()):
        rng = random.Random(f"{seed}:{country}:{qid}:pair")
        pairs.append(PreferencePair(prompt=question, chosen=row["answer"], rejected=rng.choice(wrong)))
        if limit and len(pairs) >= limit:
            break
    return pairs


def write_jsonl(rows, path: str | Path) -> Path:
    from yapo_fast.atomic import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                d = asdict(r) if hasattr(r, "__dataclass_fields__") else dict(r)
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return path


def build_country_files(country: str, out_dir: str | Path, *, seed: int = 0, digest: dict | None = None) -> list[Path]:
    """JSONL files for one country: pairs (train split) and MCQ items (test split), both settings."""
    digest = digest or load_digest()
    out_dir = Path(out_dir)
    written = []
    for setting in ("localized", "non_localized"):
        pairs = preference_pairs(country, setting, seed=seed, digest=digest)
        items = mcq_items(country, setting, seed=seed, digest=digest)
        written.append(write_jsonl(pairs, out_dir / f"{country}_{setting}_pairs.jsonl"))
        written.append(
            write_jsonl(
                [{"question": i.question, "options": i.options, "answer": i.answer, "id": i.id} for i in items],
                out_dir / f"{country}_{setting}_mcq.jsonl",
            )
        )
    return written


def load_mcq(path: str | Path) -> list[MCQItem]:
    """MCQ items from JSONL {question, options, answer} (answer a letter or the option's text)."""
    path = Path(path)
    if not path.is_file():
        raise YapoFastError(f"no multiple-choice file at {path}")
    items = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                q, opts, ans = r["question"], list(r["options"]), r["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise YapoFastError(
                    f"{path}:{n}: expected a JSON object with question, options, answer ({type(exc).__name__}: {exc})"
                ) from exc
            if not 2 <= len(opts) <= len(LETTERS):
                raise YapoFastError(f"{path}:{n}: {len(opts)} options; 2 to {len(LETTERS)} are supported")
            if ans in opts and ans not in LETTERS[: len(opts)]:
                ans = LETTERS[opts.index(ans)]
            if ans not in LETTERS[: len(opts)]:
                raise YapoFastError(f"{path}:{n}: answer {ans!r} is neither an option letter nor an option")
            items.append(MCQItem(question=q, options=opts, answer=ans, id=str(r.get("id", n))))
    return items
