"""The held-out preference margin against hand-computed values: a bigram LM whose next-token
logits are a fixed table row per token, through the real chat template, tokenization and padding."""

import math

import pytest
import torch
from eval_helpers import word_tokenizer

from yapo_fast.data.pairs import PreferencePair
from yapo_fast.errors import YapoFastError
from yapo_fast.eval.margin import margin_effect, pair_margins, response_logprobs


class BigramLM(torch.nn.Module):
    """logits at position t = table[token t]: log p(next | ...) depends on the current token only."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2)

    def forward(self, input_ids, attention_mask=None, **kw):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids])


def by_hand(lm, tok, prompt, response):
    """sum over response tokens of log softmax(table[previous token])[token], in plain Python."""
    from yapo_fast.chat import format_prompt

    p = tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    seq, total = p + r, 0.0
    for t in range(len(p), len(seq)):
        row = lm.table[seq[t - 1]].detach().tolist()
        total += row[seq[t]] - math.log(sum(math.exp(x) for x in row))
    return total


@pytest.fixture
def lm_tok():
    tok = word_tokenizer()
    return BigramLM(len(tok)), tok


PAIRS = [
    PreferencePair("x y", "A B", "C"),
    PreferencePair("z", "w1 w2 w3 w4", "w5 w6"),
    PreferencePair("x y z x y z w7", "D", "A B C D"),
]


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_response_logprobs_equal_hand_sums_at_any_padding(lm_tok, batch_size):
    lm, tok = lm_tok
    prompts, responses = [p.prompt for p in PAIRS], [p.chosen for p in PAIRS]
    got = response_logprobs(lm, tok, prompts, responses, batch_size=batch_size)
    want = torch.tensor([by_hand(lm, tok, p, r) for p, r in zip(prompts, responses)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pair_margin_is_chosen_minus_rejected(lm_tok):
    lm, tok = lm_tok
    want = [by_hand(lm, tok, p.prompt, p.chosen) - by_hand(lm, tok, p.prompt, p.rejected) for p in PAIRS]
    torch.testing.assert_close(
        pair_margins(lm, tok, PAIRS, batch_size=2), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )


def test_margin_effect_hand_values():
    steered, base = torch.tensor([3.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 1.0])
    up = margin_effect(steered, base, 1.0)  # differences 2, 0, -3
    assert up["delta"] == pytest.approx(-1 / 3) and up["moved"] == pytest.approx(1 / 3) and up["n"] == 3
    half = 1.959964 * math.sqrt((7 / 3) ** 2 / 2 + (1 / 3) ** 2 / 2 + (8 / 3) ** 2 / 2) / math.sqrt(3)
    assert up["delta_ci_high"] - up["delta"] == pytest.approx(half)
    assert margin_effect(steered, base, -1.0)["moved"] == pytest.approx(1 / 3)  # only the -3 moved down
    assert margin_effect(base + 1, base, -2.0)["moved"] == 0.0


def test_margin_refuses_an_empty_response(lm_tok):
    lm, tok = lm_tok
    with pytest.raises(YapoFastError, match="tokenized to nothing"):
        response_logprobs(lm, tok, ["x"], [""])
