"""Training steering vectors (YaPO, BiPO, CAA): the lean, exact trainer.

`train()` for a whole run; `TrainConfig` holds every setting and its default; `Trainer` runs one
step at a time for callers that need control between steps."""

from yapo_fast.train.config import TrainConfig, batch_schedule, make_optimizer
from yapo_fast.train.trainer import Trainer, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "batch_schedule", "make_optimizer", "train"]
