"""A tiny word-level tokenizer for the evaluation tests: option letters, "(" and "Answer" are
single tokens, so the scorers' letter lookup works; everything else unknown maps to <unk>."""

EVAL_WORDS = [
    "<unk>",
    "<pad>",
    "A",
    "B",
    "C",
    "D",
    "(",
    ")",
    "Answer",
    ":",
    "User",
    "Assistant",
    "Choices",
    "x",
    "y",
    "z",
]


def word_tokenizer(words=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = words or EVAL_WORDS + [f"w{i}" for i in range(128 - len(EVAL_WORDS))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<pad>")


def save_tiny_with_tokenizer(path):
    """A tiny random Llama and the word tokenizer saved together (vocab 128)."""
    from helpers import tiny_llama

    model, tok = tiny_llama(), word_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok
