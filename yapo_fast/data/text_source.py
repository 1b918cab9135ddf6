"""The text an SAE is trained (and evaluated) on: plain English prose mixed with chat transcripts.

Two sources, mixed by token share (``TextMixture``, e.g. "corpus=0.7,chat=0.3"):

- ``corpus``: detokenised public-domain books and WikiText-2 (assets/data/corpus, README there).
  Train split: the books + WikiText-2 valid; held-out split: WikiText-2 test.
- ``chat``: the steering prompts themselves through the model's chat template: BiPO training
  questions followed by both of their responses (what YaPO's loss scores), and BiPO/BLEnD questions
  followed by THE MODEL'S OWN greedy answer (what steering meets at generation time). For the
  default model these are shipped in assets/data/chat_answers/ (made by ``write_answers``, see the
  README there; only the prompts answered there are used); any other model answers the first few
  prompts on the fly (cached in the run's work dir).

Each source is a POOL of sequences in its own seeded order (``source_pools``); a token budget takes
a prefix of every pool in the mixture's proportions (``token_sequences``). A prefix of one pool does
not depend on the other pools or on the budget, so activation caches are kept per source and shared
by runs with other mixtures or budgets.

Sequences are windows of at most ``ctx`` tokens; the first position of every sequence is dropped by
the consumers (its residual norm is ~100x the others on SmolLM2: an attention sink, not text).
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from yapo_fast.data.pairs import BEHAVIOURS, DATA_DIR, bipo_csv_path, load_pairs
from yapo_fast.errors import YapoFastError

CORPUS_DIR = DATA_DIR / "corpus"
ANSWERS_DIR = DATA_DIR / "chat_answers"
SHIPPED_ANSWERS = ANSWERS_DIR / "SmolLM2-135M-Instruct.jsonl"  # the default model's greedy answers
SOURCES = ("corpus", "chat")
ANSWER_TOKENS = 48  # greedy answer length for the chat source

_TRAIN_FILES = (
    "gutenberg/austen-persuasion.txt",
    "gutenberg/bryant-stories.txt",
    "gutenberg/carroll-alice.txt",
    "gutenberg/chesterton-brown.txt",
    "gutenberg/shakespeare-hamlet.txt",
    "wikitext-2/valid.txt",
)
_HELDOUT_FILES = ("wikitext-2/test.txt",)
# chat prompts per BiPO behaviour and BLEnD questions (train, held-out); the default model's answers
# to all of them are shipped (assets/data/chat_answers)
_BIPO_PER_BEHAVIOUR = {"train": 100, "heldout": 5}
_BLEND_QUESTIONS = {"train": 160, "heldout": 20}


@dataclass(frozen=True)
class TextMixture:
    """Token shares of the sources; they need not sum to 1 (normalised)."""

    corpus: float = 0.7
    chat: float = 0.3

    @classmethod
    def parse(cls, spec: "str | TextMixture") -> "TextMixture":
        if isinstance(spec, TextMixture):
            return spec
        shares = {}
        for part in str(spec).split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in SOURCES:
                raise YapoFastError(
                    f"text mixture {spec!r}: unknown source {name!r}; use e.g. 'corpus=0.7,chat=0.3' "
                    f"(sources: {', '.join(SOURCES)})"
                )
            try:
                shares[name] = float(value)
            except ValueError:
                raise YapoFastError(f"text mixture {spec!r}: {name} needs a number, e.g. '{name}=0.5'") from None
            if shares[name] < 0:
                raise YapoFastError(f"text mixture {spec!r}: shares must be >= 0")
        out = cls(**{s: shares.get(s, 0.0) for s in SOURCES})
        if out.corpus + out.chat <= 0:
            raise YapoFastError(f"text mixture {spec!r}: at least one share must be positive")
        return out

    def __str__(self) -> str:
        return ",".join(f"{s}={getattr(self, s):g}" for s in SOURCES)


_DETOK = [
    (re.compile(r" ([.,;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
    (re.compile(r" @([-.,])@ "), r"\1"),  # WikiText: 1 @,@ 000 -> 1,000
    (re.compile(r"<unk>"), "something"),
    (re.compile(r" {2,}"), " "),
]


def detokenize(text: str) -> str:
    """Undo NLTK/WikiText tokenisation ('word , word' -> 'word, word'), so the model sees real text."""
    for pattern, repl in _DETOK:
        text = pattern.sub(repl, text)
    return text


def corpus_documents(split: str = "train") -> list[str]:
    """Detokenised documents: WikiText articles, and books cut into ~4000-character passages."""
    files = {"train": _TRAIN_FILES, "heldout": _HELDOUT_FILES}[split]
    docs: list[str] = []
    for rel in files:
        text = (CORPUS_DIR / rel).read_text(encoding="utf-8")
        if rel.startswith("wikitext"):
            parts = re.split(r"\n = (?=[^=])", text)  # top-level '= Title =' headings start articles
            docs += [detokenize(" ".join(p.split())) for p in parts if len(p) > 200]
        else:
            lines = [detokenize(line.strip()) for line in text.splitlines() if line.strip()]
            buf: list[str] = []
            for line in lines:
                buf.append(line)
                if sum(len(b) for b in buf) > 4000:
                    docs.append("\n".join(buf))
                    buf = []
            if buf:
                docs.append("\n".join(buf))
    return docs


def chat_prompt_groups(split: str = "train") -> list[list[str]]:
    """Steering prompts by source: BiPO questions per behaviour (train.csv for train, test.csv
    held out), then BLEnD questions (every 4th one held out)."""
    per = _BIPO_PER_BEHAVIOUR[split]
    groups = [
        [p.prompt for p in load_pairs(bipo_csv_path(b, "train" if split == "train" else "test"), limit=per)]
        for b in BEHAVIOURS
    ]
    with (CORPUS_DIR / "blend_questions.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    groups.append(
        [r["question"] for i, r in enumerate(rows) if (i % 4 == 3) == (split == "heldout")][: _BLEND_QUESTIONS[split]]
    )
    return groups


def chat_prompts(split: str = "train") -> list[str]:
    """All steering prompts of a split, source by source (a few BiPO questions repeat: kept once)."""
    return list(dict.fromkeys(p for g in chat_prompt_groups(split) for p in g))


def interleaved_chat_prompts(split: str = "train") -> list[str]:
    """The same prompts round-robin over their sources, so that a partial answering run covers
    every source."""
    groups = chat_prompt_groups(split)
    out = [g[i] for i in range(max(len(g) for g in groups)) for g in groups if i < len(g)]
    return list(dict.fromkeys(out))


def write_answers(
    model,
    tokenizer,
    prompts: list[str],
    path: Path,
    *,
    batch_size: int = 16,
    max_new_tokens: int = ANSWER_TOKENS,
    progress: bool = True,
) -> dict[str, str]:
    """Greedy answers of `model` to `prompts`, appended to a JSONL cache (resumable: answered
    prompts are skipped; each batch is appended whole, a torn last line is ignored on reload)."""
    from tqdm.auto import tqdm

    from yapo_fast.eval.generate import generate_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        # a kill mid-write leaves a torn last line: cut it, or the next record would be glued to it
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    done = load_answers(path)
    todo = [p for p in dict.fromkeys(prompts) if p not in done]
    with (
        path.open("a", encoding="utf-8") as f,
        tqdm(total=len(todo), desc="model answers", unit="prompt", disable=not progress) as bar,
    ):
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            answers = generate_text(model, tokenizer, batch, max_new_tokens=max_new_tokens)
            f.write("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(batch, answers)))
            f.flush()
            done.update(zip(batch, answers))
            bar.update(len(batch))
    return done


def load_answers(path: Path) -> dict[str, str]:
    """prompt -> answer from a JSONL cache; a line torn by a kill is skipped (and re-answered)."""
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            out[row["prompt"]] = row["answer"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return out


def chat_documents(tokenizer, split: str, answers: dict[str, str] | None) -> list[str]:
    """Chat transcripts through the model's template: every BiPO prompt of the split with both of
    its responses (the texts YaPO's loss scores, so the activations it steers during training), and
    every chat prompt the model has answered with that answer (the activations steered at
    generation time)."""
    from yapo_fast.chat import format_prompt

    end = tokenizer.eos_token or ""
    docs = []
    for behaviour in BEHAVIOURS:
        pairs = load_pairs(
            bipo_csv_path(behaviour, "train" if split == "train" else "test"), limit=_BIPO_PER_BEHAVIOUR[split]
        )
        for p in pairs:
            docs += [
                format_prompt(tokenizer, p.prompt) + p.chosen + end,
                format_prompt(tokenizer, p.prompt) + p.rejected + end,
            ]
    answers = answers or {}
    docs += [format_prompt(tokenizer, p) + answers[p] + end for p in chat_prompts(split) if p in answers]
    return docs


def _window(ids: list[int], ctx: int) -> list[list[int]]:
    return [ids[s : s + ctx] for s in range(0, len(ids), ctx) if len(ids[s : s + ctx]) >= 8]


def source_pools(
    tokenizer, *, split: str, mixture: "TextMixture | str", ctx: int, seed: int, chat_answers: dict[str, str] | None
) -> dict[str, list[list[int]]]:
    """source -> all its token sequences (each <= ctx tokens) in an order seeded by (seed, source),
    for the sources with a positive share. A pool does not depend on the other sources."""
    mixture = TextMixture.parse(mixture)
    pools: dict[str, list[list[int]]] = {}
    if mixture.corpus > 0:
        pools["corpus"] = [
            w
            for doc in corpus_documents(split)
            for w in _window(tokenizer(doc, add_special_tokens=False)["input_ids"], ctx)
        ]
    if mixture.chat > 0:
        docs = chat_documents(tokenizer, split, chat_answers)
        pools["chat"] = [tokenizer(d, add_special_tokens=False)["input_ids"][:ctx] for d in docs]
    for name, seqs in pools.items():
        random.Random(f"{seed}:{name}").shuffle(seqs)
    return pools


def mixture_counts(
    pools: dict[str, list[list[int]]], mixture: "TextMixture | str", max_tokens: int
) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """Which sequences a budget of `max_tokens` takes: the source furthest below its share goes next
    (whole sequences only, position 0 not counted, since consumers drop it). Returns the order as
    (source, index in its pool) and the tokens taken per source; every source's picks are a
    prefix of its pool, and a larger budget's picks extend a smaller one's."""
    mixture = TextMixture.parse(mixture)
    share = {s: getattr(mixture, s) for s in pools}
    used = {s: 0 for s in pools}
    nxt = {s: 0 for s in pools}
    order: list[tuple[str, int]] = []
    total = 0
    while total < max_tokens:
        live = [s for s in pools if nxt[s] < len(pools[s])]
        if not live:
            break
        src = min(live, key=lambda s: used[s] / share[s])
        order.append((src, nxt[src]))
        n = len(pools[src][nxt[src]]) - 1
        nxt[src] += 1
        used[src] += n
        total += n
    return order, used


def token_sequences(
    tokenizer,
    *,
    split: str,
    mixture: "TextMixture | str",
    ctx: int,
    max_tokens: int,
    seed: int,
    chat_answers: dict[str, str] | None,
) -> tuple[list[list[int]], dict]:
    """Token-id sequences (each <= ctx tokens) whose token counts follow `mixture` until
    `max_tokens`, interleaved. Returns (sequences, stats of what was used)."""
    mixture = TextMixture.parse(mixture)
    pools = source_pools(tokenizer, split=split, mixture=mixture, ctx=ctx, seed=seed, chat_answers=chat_answers)
    order, used = mixture_counts(pools, mixture, max_tokens)
    return [pools[s][i] for s, i in order], text_stats(pools, mixture, split, ctx, order, used)


def text_stats(pools, mixture, split, ctx, order, used) -> dict:
    taken = {s: sum(1 for src, _ in order if src == s) for s in pools}
    return {
        "mixture": str(TextMixture.parse(mixture)),
        "split": split,
        "ctx": ctx,
        "tokens_by_source": used,
        "sequences": len(order),
        "sequences_by_source": taken,
        "exhausted": [s for s in pools if taken[s] >= len(pools[s])],
    }
