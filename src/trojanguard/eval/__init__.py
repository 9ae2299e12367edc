"""Metrics and evaluation."""
from . import metrics
from .evaluate import evaluate, predict

__all__ = ["metrics", "evaluate", "predict"]
