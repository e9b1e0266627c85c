"""The registered MLflow model, logged as code (no pickle):
DataFrame(user_text, ad_text[, ad_id][, user_prior_impressions, user_prior_clicks]) -> pCTR.

Without an ad_id column (or for ids the model never saw in training) ads are scored as cold-start: by
their text alone. Without the user's impressions and clicks before the request, users are scored as
having none yet.

MLflow executes this file when the model is loaded; the weights come from the `checkpoint`
artifact (safetensors + tokenizer files), the settings from the logged model_config.
"""

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from tasks.model import load_calibration, load_cross_encoder, pick_device, predict_ctr
from tasks.pairs import user_history
from tasks.two_tower import load_two_tower


class CrossEncoderCTR(PythonModel):
    def load_context(self, context) -> None:
        self.max_length = int(context.model_config["max_seq_length"])
        self.batch_size = int(context.model_config["batch_size"])
        self.model, self.tokenizer = load_cross_encoder(context.artifacts["checkpoint"], pick_device())
        self.calibration = load_calibration(context.artifacts["checkpoint"])
        self.two_tower = load_two_tower(context.artifacts["checkpoint"])  # stage 1 of rerank; None if absent

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        return predict_ctr(
            self.model,
            self.tokenizer,
            model_input["user_text"].astype(str).tolist(),
            model_input["ad_text"].astype(str).tolist(),
            self.max_length,
            self.batch_size,
            self.calibration,
            model_input["ad_id"].astype(str).tolist() if "ad_id" in model_input else None,
            user_history(model_input),
        )


mlflow.models.set_model(CrossEncoderCTR())
