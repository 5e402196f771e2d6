"""The variant trainer: ``run_variant(config, reporter) -> TrainResult``."""
from .config import DataConfig, DistillConfig, OptimConfig, TrainConfig
from .loop import TrainResult, run_variant
from .reporter import LocalReporter, Reporter

__all__ = ["DataConfig", "DistillConfig", "OptimConfig", "TrainConfig", "TrainResult", "run_variant",
           "LocalReporter", "Reporter"]
