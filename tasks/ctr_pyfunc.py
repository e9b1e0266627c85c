"""The registered MLflow model, logged as code (no pickle):
DataFrame(user_text, ad_text[, ad_id][, user_prior_impressions, user_prior_clicks]) -> pCTR.

Without an ad_id (the column, or null in a row), or for ids the model never saw in training, ads are
scored as cold-start: by their text alone. Without the user's impressions and clicks before the request
(the columns, or null in a row), users are scored as having none yet.

MLflow executes this file when the model is loaded; the weights come from the `checkpoint`
artifact (safetensors + tokenizer files), the settings from the logged model_config. The modules it
imports travel with the model (code_paths in tasks/registry.py), so it serves wherever its pinned
requirements are installed, adrank or not.
"""

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from tasks.model import load_calibration, load_cross_encoder, pick_device, predict_ctr
from tasks.two_tower import load_two_tower

USER_PRIOR_COLUMNS = ("user_prior_clicks", "user_prior_impressions")


class CrossEncoderCTR(PythonModel):
    def load_context(self, context) -> None:
        self.max_length = int(context.model_config["max_seq_length"])
        self.batch_size = int(context.model_config["batch_size"])
        self.model, self.tokenizer = load_cross_encoder(context.artifacts["checkpoint"], pick_device())
        self.calibration = load_calibration(context.artifacts["checkpoint"])
        self.two_tower = load_two_tower(context.artifacts["checkpoint"])  # stage 1 of rerank; None if absent

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        for column in ("user_text", "ad_text"):
            missing = model_input[column].isna() if column in model_input else None
            if missing is None or missing.any():
                rows = "" if missing is None else list(np.flatnonzero(missing))[:10]
                where = "the column is missing" if missing is None else f"null in rows {rows}"
                raise ValueError(f"{column} is required: {where}")
        return predict_ctr(
            self.model,
            self.tokenizer,
            model_input["user_text"].astype(str).tolist(),
            model_input["ad_text"].astype(str).tolist(),
            self.max_length,
            self.batch_size,
            self.calibration,
            ad_ids(model_input),
            user_history(model_input),
        )


def ad_ids(frame: pd.DataFrame) -> list[str | None] | None:
    """Each row's ad id as a string, None where it is null (a cold-start ad); None without the column."""
    if "ad_id" not in frame:
        return None
    return [None if pd.isna(ad) else str(ad) for ad in frame["ad_id"]]


def user_history(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """Each row's (clicks, impressions) before the request, (0, 0) where either is null (no history known);
    None without the columns."""
    present = [column for column in USER_PRIOR_COLUMNS if column in frame]
    if not present:
        return None
    if len(present) < len(USER_PRIOR_COLUMNS):
        raise ValueError(f"the user prior needs both {USER_PRIOR_COLUMNS}; only {present} given")
    counts = frame[list(USER_PRIOR_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    counts = counts.where(counts.notna().all(axis=1), 0)  # (rows, 2)
    return counts["user_prior_clicks"].to_numpy(np.int64), counts["user_prior_impressions"].to_numpy(np.int64)


mlflow.models.set_model(CrossEncoderCTR())
