"""Training: stages, objectives (in each construct's file), calibration, evaluation."""

from .evaluate import evaluate
from .loop import TrainingError, TrainResult, train

__all__ = ["TrainResult", "TrainingError", "evaluate", "train"]
