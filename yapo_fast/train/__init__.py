"""Training steering vectors (YaPO, BiPO, CAA): the lean, exact trainer. See trainer.train."""

from .config import TrainConfig, batch_schedule, make_optimizer
from .trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "batch_schedule", "make_optimizer", "train"]
