"""The study driver: Tune + Optuna wiring, MLflow tracking, Pareto analysis, config export."""
