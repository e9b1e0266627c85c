"""adrank's Prefect flows. Importing them (the CLI, a deployment's worker) quiets MLflow's console output to
warnings and errors: its INFO lines and per-download progress bars would bury the flow logs. Set
MLFLOW_LOGGING_LEVEL or MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR to see them again."""

import os

os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
