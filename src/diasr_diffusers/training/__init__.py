"""Training: two-stage DiasR training (align, route) with accelerate + peft."""

from .config import STAGES, ConfigError, TrainConfig
from .trainer import DiasRTrainer

__all__ = ["STAGES", "ConfigError", "DiasRTrainer", "TrainConfig"]
