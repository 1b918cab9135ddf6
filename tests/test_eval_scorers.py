"""The A/B, multiple-choice and MMLU scorers against hand-computed values: a fake LM returns logits
that we choose per item, through the real prompt building, tokenization, padding and letter lookup."""

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_llama

from yapo_fast import SteeringVector, model_identity, steer
from yapo_fast.data.blend import MCQItem
from yapo_fast.errors import YapoFastError
from yapo_fast.eval.ab import ABItem, ab_scores, mean_ci95
from yapo_fast.eval.mcq import mcq_correct
from yapo_fast.eval.mmlu import mmlu_correct
from yapo_fast.eval.score import letter_token_ids, next_token_logits

WORDS = ["<unk>", "<pad>", "A", "B", "C", "D", "(", ")", "Answer", ":", "User", "Assistant", "x", "y", "z"]
MARKERS = [f"q{i}" for i in range(8)]


def word_tokenizer(words=WORDS + MARKERS + [f"w{i}" for i in range(100)]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<pad>")


class FakeLM(torch.nn.Module):
    """Next-token logits chosen per item: the row's last marker token q<i> selects table[i]
    (a {letter: logit} dict); every other token gets -50."""

    def __init__(self, tokenizer, table):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab = len(tokenizer)
        self.letter = {c: tokenizer.convert_tokens_to_ids(c) for c in "ABCD"}
        self.marker = {tokenizer.convert_tokens_to_ids(m): i for i, m in enumerate(MARKERS)}
        self.table = table
        self.calls = []

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
        assert logits_to_keep == 1 and bool(attention_mask[:, -1].all()), "left padding expected"
        self.calls.append(input_ids.shape)
        out = torch.full((input_ids.shape[0], 1, self.vocab), -50.0)
        for r, row in enumerate(input_ids.tolist()):
            i = [self.marker[t] for t in row if t in self.marker][-1]
            for c, logit in self.table[i].items():
                out[r, 0, self.letter[c]] = logit
        return SimpleNamespace(logits=out)


def test_ab_scorer_matches_hand_computed():
    tok = word_tokenizer()
    table = {
        0: {"A": 2.0, "B": 0.0},
        1: {"A": 1.0, "B": 1.0},
        2: {"A": 0.0, "B": math.log(3)},
        3: {"A": -1.0, "B": 3.0},
    }
    items = [
        ABItem("q0 x", "y", "z", "A"),
        ABItem("q1 x x x x x", "y", "z", "B"),
        ABItem("q2", "y y", "z", "B"),
        ABItem("q3 x y", "z", "z", "A"),
    ]
    scores = ab_scores(FakeLM(tok, table), tok, items, batch_size=3)
    expected = [1 / (1 + math.exp(-2)), 0.5, 0.75, 1 / (1 + math.exp(4))]
    assert scores.tolist() == pytest.approx(expected, abs=1e-6)
    mean, lo, hi = mean_ci95(scores)
    t = torch.tensor(expected, dtype=torch.float64)
    half = 1.959964 * float(t.std()) / 2
    assert mean == pytest.approx(sum(expected) / 4, abs=1e-6) and hi - mean == pytest.approx(half, abs=1e-6)
    assert lo == pytest.approx(mean - half, abs=1e-6)


def test_mcq_scorer_matches_hand_computed():
    tok = word_tokenizer()
    table = {
        0: {"A": 0.0, "B": 1.0, "C": 3.0, "D": 2.0},
        1: {"A": 0.0, "B": 2.0, "C": 0.0, "D": 0.0},
        2: {"A": 0.0, "B": 1.0, "C": 0.0, "D": 5.0},
    }  # item 2 has 3 options: D's logit must be ignored
    items = [
        MCQItem("q0 x", ["w1", "w2", "w3", "w4"], "C"),
        MCQItem("q1 y", ["w1", "w2", "w3", "w4"], "A"),
        MCQItem("q2 z", ["w1", "w2", "w3"], "B"),
    ]
    correct, p = mcq_correct(FakeLM(tok, table), tok, items, batch_size=2)
    assert correct.tolist() == [1.0, 0.0, 1.0]
    e = math.e
    assert p.tolist() == pytest.approx([e**3 / (1 + e + e**3 + e**2), 1 / (3 + e**2), e / (2 + e)], abs=1e-6)


def test_mmlu_scorer_matches_hand_computed_and_uses_shots():
    tok = word_tokenizer()
    dev = [MCQItem(f"w{i} x", ["w1", "w2", "w3", "w4"], "B", country="astro") for i in range(3)]
    items = [
        MCQItem("q0 x", ["w5", "w6", "w7", "w8"], "D", country="astro"),
        MCQItem("q1 x", ["w5", "w6", "w7", "w8"], "A", country="astro"),
        MCQItem("q2 x", ["w5", "w6", "w7", "w8"], "B", country="astro"),
    ]
    table = {0: {"D": 1.0}, 1: {"A": 0.5, "B": 0.7}, 2: {"B": 4.0, "C": 3.9}}
    lm = FakeLM(tok, table)
    correct = mmlu_correct(lm, tok, items, shots=2, dev=dev, batch_size=8)
    assert correct.tolist() == [1.0, 0.0, 1.0]
    one = mmlu_correct(lm, tok, items[:1], shots=1, dev=dev)
    two = mmlu_correct(lm, tok, items[:1], shots=2, dev=dev)
    assert one.tolist() == two.tolist() == [1.0]
    assert lm.calls[-1][1] > lm.calls[-2][1]  # the 2-shot prompt is longer than the 1-shot one
    with pytest.raises(YapoFastError, match="fewer than shots"):
        mmlu_correct(lm, tok, items, shots=4, dev=dev)


def test_letters_must_be_single_tokens():
    tok = word_tokenizer()
    assert letter_token_ids(tok, "AB") == [2, 3]
    with pytest.raises(YapoFastError, match="one token"):  # ":(" merges into one (unknown) token
        letter_token_ids(tok, "(", prefix="Answer:")
    with pytest.raises(YapoFastError, match="repeated"):
        letter_token_ids(tok, "AA")


def test_batched_padded_logits_equal_one_at_a_time():
    """Left padding with explicit positions is exact: a batch equals each prompt alone."""
    model = tiny_llama()
    tok = word_tokenizer(["<unk>", "<pad>"] + [f"w{i}" for i in range(2, 128)])
    texts = [" ".join(f"w{(7 * i + j) % 120 + 2}" for j in range(n)) for i, n in enumerate([3, 11, 6, 17, 1])]
    ids = list(range(2, 12))
    batched = next_token_logits(model, tok, texts, ids, batch_size=4)
    for r, text in enumerate(texts):
        single = model(torch.tensor([tok(text)["input_ids"]])).logits[0, -1, ids]
        assert torch.allclose(batched[r], single, atol=1e-5, rtol=1e-5)


def test_steering_moves_scores_and_zero_multiplier_is_identity():
    model = tiny_llama()
    tok = word_tokenizer(
        ["<unk>", "<pad>"]
        + [f"w{i}" for i in range(2, 118)]
        + ["A", "B", "(", "Answer", ":", "User", "Assistant", "Choices"]
    )
    items = [ABItem(f"w{i} w{i + 1} w{i + 2}", f"w{i + 3}", f"w{i + 4}", "AB"[i % 2]) for i in range(6)]
    vec = SteeringVector.from_dense(
        8 * torch.randn(64, generator=torch.Generator().manual_seed(1)),
        method="bipo",
        layer=1,
        model=model_identity(model),
    )
    base = ab_scores(model, tok, items)
    with steer(model, vec, 0.0):
        zero = ab_scores(model, tok, items)
    with steer(model, vec, 2.0):
        moved = ab_scores(model, tok, items)
    assert torch.allclose(base, zero, atol=1e-6)
    assert (moved - base).abs().max() > 1e-3
