"""What a training run is: its settings, and the deterministic order of batches and directions.

The batch order and the direction d of every batch are a pure function of (n_pairs, batch_size,
epochs, seed): a resumed run, a second process and the naive baseline all see the same sequence.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch

from ..errors import YapoFastError

TRAIN_METHODS = ("yapo", "bipo", "caa")


@dataclass
class TrainConfig:
    method: str
    layer: int
    epochs: int = 1
    batch_size: int = 4
    lr: float = 5e-4
    beta: float = 0.1
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    system: str | None = None
    checkpoint_every: int = 50  # optimizer steps between checkpoints (and at every epoch end)
    caa_reduce: str = "mean"  # caa: mean over response tokens or the last token

    def validate(self) -> "TrainConfig":
        if self.method not in TRAIN_METHODS:
            raise YapoFastError(f"unknown training method {self.method!r}; use one of {TRAIN_METHODS}")
        for name in ("epochs", "batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise YapoFastError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise YapoFastError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        for name in ("lr", "beta", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise YapoFastError(f"{name} must be a positive finite number, got {value!r}")
        if self.caa_reduce not in ("mean", "last"):
            raise YapoFastError(f"caa_reduce must be 'mean' or 'last', got {self.caa_reduce!r}")
        return self

    def fingerprint(self, **extra) -> str:
        """Identity of a run for its checkpoints: settings plus data/model/SAE identities."""
        settings = {k: v for k, v in asdict(self).items() if k != "checkpoint_every"}  # does not change the result
        blob = json.dumps({**settings, **extra}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def batch_schedule(n_pairs: int, batch_size: int, epochs: int, seed: int) -> list[tuple[int, list[int], int]]:
    """[(epoch, pair indices, d)] for every optimizer step: a seeded shuffle per epoch (the last
    batch of an epoch may be smaller) and d in {-1, +1} drawn per batch."""
    if n_pairs < 1:
        raise YapoFastError("training needs at least one preference pair")
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for epoch in range(epochs):
        perm = torch.randperm(n_pairs, generator=g).tolist()
        for start in range(0, n_pairs, batch_size):
            d = 1 if int(torch.randint(0, 2, (1,), generator=g)) else -1
            out.append((epoch, perm[start : start + batch_size], d))
    return out


def make_optimizer(v: torch.Tensor, cfg: TrainConfig, total_steps: int):
    """AdamW without weight decay (entries that never get a gradient stay exactly 0) and the
    cosine schedule with linear warm-up of the reference."""
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW([v], lr=cfg.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)
    return opt, sched
