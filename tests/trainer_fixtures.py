"""Small preference data and a tiny model for the trainer tests (shared by tests/test_train_lean*.py)."""

import pytest
import torch
from helpers import random_sae, tiny_llama
from naive_trainer import ByteTokenizer

from yapo_fast.data.pairs import PreferencePair

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


KW = dict(layer=LAYER, epochs=3, batch_size=2, lr=5e-2, warmup_steps=2, progress=False)


def ddp_worker(rank, world, init_file, methods, result_file):
    """One process of a 2-process (gloo) run; lives here so that spawned children can import it."""
    import torch.distributed as dist

    import yapo_fast

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, tok, sae = tiny_setup("relu")
        results = {}
        for method in methods:
            res = yapo_fast.train(
                method,
                tiny_pairs(7),
                model=model,
                tokenizer=tok,
                sae=sae if method == "yapo" else None,
                **{**KW, "batch_size": 4},
            )
            results[method] = {"v": res.vector.values, "losses": [r["loss"] for r in res.losses]}
        if rank == 0:
            torch.save(results, result_file)
    finally:
        dist.destroy_process_group()
