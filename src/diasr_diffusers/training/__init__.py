"""Training: two-stage DiasR training (align, route) with accelerate + peft."""

from .config import STAGES, ConfigError, TrainConfig
from .ingredients import IngredientsTrainer
from .trainer import DiasRTrainer

__all__ = ["STAGES", "ConfigError", "DiasRTrainer", "IngredientsTrainer", "TrainConfig"]
