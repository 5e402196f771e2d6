"""Pure training code: binarization, layers, blocks, models, data, trainer (no Ray/MLflow/Optuna/SQLAlchemy)."""
