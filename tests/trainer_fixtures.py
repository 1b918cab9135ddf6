"""Small preference data and a tiny model for the trainer tests (shared by tests/test_trainer*.py)."""

import pytest
import torch

from helpers import random_sae, tiny_llama
from naive_trainer import ByteTokenizer
from yapo_fast.data import PreferencePair

LAYER = 1  # steer layer 1 of the 4-layer tiny Llama: layers 2..3 run per step

WORDS = "yes no cat dog sun red big old hot far up on".split()


def tiny_pairs(n: int = 8, seed: int = 0) -> list[PreferencePair]:
    """Short prompts and responses of varied lengths (so padding is exercised)."""
    g = torch.Generator().manual_seed(seed)

    def sent(k):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    return [PreferencePair(sent(1 + i % 4), sent(1 + i % 3), sent(1 + (i + 1) % 4)) for i in range(n)]


def tiny_setup(kind: str = "relu"):
    """(model, tokenizer, sae) with an SAE whose latents fire on the tiny model's states."""
    model = tiny_llama()
    sae = random_sae(kind, layer=LAYER, d_sae=96)
    if kind == "jumprelu":  # the random thresholds would silence every latent on a random model
        sae.threshold = sae.threshold * 0.05
    return model, ByteTokenizer(), sae


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: these tiny shapes run far faster without thread hand-offs on the
    shared 2-core machine. Restored afterwards for the rest of the suite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
