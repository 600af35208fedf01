"""Training: stages, objectives (in each construct's file), calibration, evaluation."""

from .evaluate import evaluate
from .loop import TrainingError, train

__all__ = ["TrainingError", "evaluate", "train"]
