"""What a training run is: its settings, and the deterministic order of batches and directions.

The batch order and the direction d of every batch are a pure function of (n_pairs, batch_size,
epochs, seed): a resumed run, a second process and the naive baseline all see the same sequence.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields

import torch

from yapo_fast.errors import YapoFastError, check_multiplier
from yapo_fast.train.sparsity import check_sparsity

TRAIN_METHODS = ("yapo", "bipo", "caa")
# settings that do not change the trained vector, left out of a run's fingerprint (a run resumed
# with another checkpoint interval or cache bound is the same run); holdout, patience, support and
# l1 enter it as extras, so that dense runs keep the identity they had before those existed
_NOT_IN_FINGERPRINT = (
    "checkpoint_every",
    "multiplier",
    "cache_batch_size",
    "cache_memory_bytes",
    "pack_tokens",
    "holdout",
    "patience",
    "support",
    "l1",
)


def _opt(help: str, **cli) -> dict:
    """Field metadata: the CLI help (and argparse extras such as choices or a flag name)."""
    return {"help": help, **cli}


@dataclass
class TrainConfig:
    """Every setting of a training run, with its default: `yapo_fast.train(**settings)` and
    `yapo-fast train --flags` both start from here (the defaults are the paper's reference
    schedule)."""

    method: str = field(default="yapo", metadata=_opt("yapo (SAE latents), bipo (dense) or caa", choices=TRAIN_METHODS))
    layer: int | None = field(default=None, metadata=_opt("decoder layer to steer (default: the SAE's layer)"))
    epochs: int = field(default=1, metadata=_opt("passes over the pairs"))
    batch_size: int = field(default=4, metadata=_opt("pairs per optimizer step"))
    lr: float = field(default=5e-4, metadata=_opt("AdamW learning rate (peak of the cosine schedule)"))
    beta: float = field(default=0.1, metadata=_opt("DPO temperature"))
    warmup_steps: int = field(default=100, metadata=_opt("linear warm-up steps of the cosine schedule"))
    grad_clip: float = field(default=1.0, metadata=_opt("gradient norm clip"))
    seed: int = field(default=0, metadata=_opt("seed of the batch order, the directions d and the holdout split"))
    system: str | None = field(default=None, metadata=_opt("system prompt for the chat template"))
    multiplier: float = field(default=1.0, metadata=_opt("the saved vector's default multiplier"))
    caa_reduce: str = field(
        default="mean",
        metadata=_opt("caa: mean over response tokens or the last token", flag="--reduce", choices=("mean", "last")),
    )
    holdout: float = field(default=0.0, metadata=_opt("fraction of pairs held out (evaluated after every epoch)"))
    patience: int | None = field(
        default=None, metadata=_opt("with holdout: stop after N epochs without a better held-out accuracy")
    )
    support: int | None = field(
        default=None, metadata=_opt("yapo: keep at most K non-zero latents (top-k by effect after every step)")
    )
    l1: float = field(default=0.0, metadata=_opt("yapo: L1 strength (soft threshold lr*l1 after every step)"))
    checkpoint_every: int = field(
        default=50, metadata=_opt("optimizer steps between checkpoints (and every epoch end)")
    )
    cache_batch_size: int = field(default=8, metadata=_opt("pairs per forward when caching layer-L states"))
    cache_memory_bytes: int | None = field(
        default=None, metadata=_opt("bound on the in-memory layer-L cache in bytes; the rest spills to disk")
    )
    pack_tokens: int = field(
        default=256, metadata=_opt("sequences of a batch are packed into rows of about this many tokens")
    )

    @classmethod
    def of(cls, method: str, **settings) -> "TrainConfig":
        """A validated config from keyword settings; an unknown name is refused with the list."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise YapoFastError(f"unknown training setting(s) {unknown}; settings: {sorted(names - {'method'})}")
        return cls(method=method, **settings).validate()

    def validate(self) -> "TrainConfig":
        if self.method not in TRAIN_METHODS:
            raise YapoFastError(f"unknown training method {self.method!r}; use one of {TRAIN_METHODS}")
        for name in ("epochs", "batch_size", "checkpoint_every", "cache_batch_size", "pack_tokens"):
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
        self.multiplier = check_multiplier(self.multiplier, "the vector's default multiplier")
        if not (isinstance(self.holdout, (int, float)) and 0 <= self.holdout < 1):
            raise YapoFastError(f"holdout must be a fraction in [0, 1), got {self.holdout!r}")
        if self.patience is not None and (not self.holdout or not isinstance(self.patience, int) or self.patience < 1):
            raise YapoFastError("patience (early stopping) needs holdout > 0 and a positive integer patience")
        check_sparsity(self.method, self.support, self.l1, None)
        return self

    def fingerprint(self, **extra) -> str:
        """Identity of a run for its checkpoints: the settings that shape the vector, plus
        data/model/SAE identities."""
        settings = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_FINGERPRINT}
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
