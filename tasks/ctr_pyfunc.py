"""The registered MLflow model, logged as code (no pickle):
DataFrame(user_text, ad_text[, ad_id][, user_prior_impressions, user_prior_clicks][, ad_prior_impressions,
ad_prior_clicks][, shown_ad_texts, shown_clicked]) -> pCTR.

The counts are the user's and the ad's impressions and clicks before the request (adrank counts them up to
the start of the day it ranks). Without the ad's (the columns, or null in a row) the ad is scored as cold:
by its text, with the cold-ad weights. Without the user's, users are scored as having none yet. ad_id is
read only by versions registered before adrank counted ads per request (a frozen table of ad ids).
shown_ad_texts and shown_clicked (lists, latest first) are the user's past impressions, read by versions with the
affinity term (tasks/affinity.py); without them the user is scored as shown nothing before.

MLflow executes this file when the model is loaded; the weights come from the `checkpoint`
artifact (safetensors + tokenizer files), the settings from the logged model_config. The modules it
imports travel with the model (code_paths in tasks/registry.py), so it serves wherever its pinned
requirements are installed, adrank or not.
"""

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from tasks.affinity import SHOWN_TEXT_COLUMN, similar_counts
from tasks.model import load_cross_encoder, pick_device, predict_ctr
from tasks.output_layer import MATCH_COLUMN, SIMILAR_COLUMNS, PairPriors, load_calibration
from tasks.semantic_match import saved_match_encoder
from tasks.two_tower import load_two_tower


class CrossEncoderCTR(PythonModel):
    def load_context(self, context) -> None:
        self.max_length = int(context.model_config["max_seq_length"])
        self.batch_size = int(context.model_config["batch_size"])
        checkpoint, device = context.artifacts["checkpoint"], pick_device()
        self.model, self.tokenizer = load_cross_encoder(checkpoint, device)
        self.calibration = load_calibration(checkpoint)
        self.two_tower = load_two_tower(checkpoint)  # stage 1 of rerank; None if absent
        # the semantic match's encoder as fitted (tuned on clicks, frozen); None for versions registered without one
        self.match_encoder = saved_match_encoder(checkpoint, device, self.max_length, self.batch_size)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        for column in ("user_text", "ad_text"):
            missing = model_input[column].isna() if column in model_input else None
            if missing is None or missing.any():
                rows = "" if missing is None else list(np.flatnonzero(missing))[:10]
                where = "the column is missing" if missing is None else f"null in rows {rows}"
                raise ValueError(f"{column} is required: {where}")
        user_texts, ad_texts = (
            model_input["user_text"].astype(str).tolist(),
            model_input["ad_text"].astype(str).tolist(),
        )
        features = numeric_counts(model_input)
        if self.match_encoder is not None:
            features = features.assign(**{MATCH_COLUMN: self.match_encoder.match(user_texts, ad_texts)})
        if self.match_encoder is not None and self.calibration.uses_affinity:
            similar = self.similar(model_input, ad_texts)
            features = features.assign(**{name: similar[:, i] for i, name in enumerate(SIMILAR_COLUMNS)})
        return predict_ctr(
            self.model,
            self.tokenizer,
            user_texts,
            ad_texts,
            self.max_length,
            self.batch_size,
            self.calibration,
            PairPriors.of(features),
        )

    def similar(self, model_input: pd.DataFrame, ad_texts: list[str]) -> np.ndarray:
        """The affinity term's similar counts from the shown_ad_texts and shown_clicked lists (none: zeros)."""
        present = [c for c in (SHOWN_TEXT_COLUMN, "shown_clicked") if c in model_input]
        if len(present) == 1:
            raise ValueError(f"{SHOWN_TEXT_COLUMN} and shown_clicked go together: only {present[0]} given")
        rows = model_input[present].itertuples(index=False) if present else [([], [])] * len(ad_texts)
        shown = [(_as_list(t), _as_list(c)) for t, c in rows]
        bad = [i for i, (t, c) in enumerate(shown) if len(t) != len(c)][:10]
        if bad:
            raise ValueError(f"{SHOWN_TEXT_COLUMN} and shown_clicked differ in length in rows {bad}")
        lengths = np.array([len(t) for t, _ in shown], dtype=np.int64)
        texts = [str(text) for t, _ in shown for text in t]
        clicked = np.array([bool(flag) for _, c in shown for flag in c], dtype=np.float64)
        bandwidth = self.calibration.affinity_bandwidth
        return similar_counts(self.match_encoder, ad_texts, texts, lengths, clicked, bandwidth)


def _as_list(value) -> list:
    """A list cell as a list; null (None, or NaN where pandas filled a missing row) as empty."""
    return list(value) if isinstance(value, list | tuple | np.ndarray) else []


def numeric_counts(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with its count columns as numbers (JSON may carry them as strings); unparseable -> null."""
    counts = [column for column in frame.columns if column.endswith(("_prior_impressions", "_prior_clicks"))]
    return frame.assign(**{column: pd.to_numeric(frame[column], errors="coerce") for column in counts})


mlflow.models.set_model(CrossEncoderCTR())
