"""ID-based CTR baselines on the same pairs: logistic regression on one-hot ids and side features,
and gradient-boosted trees (LightGBM) on the same features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder

ID_COLUMNS = ("user_id", "ad_id")
AD_SIDE_COLUMNS = ("category",)
LOGREG_C = 0.5  # inverse L2 strength; ids are many and sparse
LIGHTGBM_PARAMS = {
    "n_estimators": 400,
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_child_samples": 20,
    "subsample": 0.8,
    "subsample_freq": 1,
    "colsample_bytree": 0.8,
    "verbose": -1,
}
EARLY_STOPPING_ROUNDS = 30


def side_features(pairs: pl.DataFrame, users: pl.DataFrame, ads: pl.DataFrame) -> pd.DataFrame:
    """ids + every user profile column + ad category, one row per pair, as strings or numbers."""
    side_ads = ads.select("ad_id", *[c for c in AD_SIDE_COLUMNS if c in ads.columns])
    frame = pairs.select(*ID_COLUMNS).join(users, on="user_id", how="left", maintain_order="left")
    frame = frame.join(side_ads, on="ad_id", how="left", maintain_order="left")
    return frame.to_pandas()


def logistic_regression(train: pd.DataFrame, labels: np.ndarray, test: pd.DataFrame, seed: int) -> np.ndarray:
    """One-hot every column (numbers too: age becomes one indicator per value); unseen values are all-zero."""
    model = make_pipeline(
        OneHotEncoder(handle_unknown="ignore"),
        LogisticRegression(C=LOGREG_C, max_iter=2000, random_state=seed),
    )
    model.fit(train.astype(str), labels)
    return model.predict_proba(test.astype(str))[:, 1]


def lightgbm(
    train: pd.DataFrame,
    labels: np.ndarray,
    valid: pd.DataFrame,
    valid_labels: np.ndarray,
    test: pd.DataFrame,
    seed: int,
) -> np.ndarray:
    """Trees over ids and side features as categoricals, early-stopped on validation logloss."""
    import lightgbm as lgb

    frames = [train.copy(), valid.copy(), test.copy()]
    for column in train.columns:
        if not pd.api.types.is_numeric_dtype(train[column]) or column in ID_COLUMNS:
            categories = pd.Index(pd.concat([f[column] for f in frames]).astype(str).unique())
            for frame in frames:
                frame[column] = pd.Categorical(frame[column].astype(str), categories=categories)
    model = lgb.LGBMClassifier(random_state=seed, **LIGHTGBM_PARAMS)
    model.fit(
        frames[0],
        labels,
        eval_X=frames[1],
        eval_y=valid_labels,
        eval_metric="binary_logloss",
        callbacks=[lgb.early_stopping(EARLY_STOPPING_ROUNDS, verbose=False)],
    )
    return model.predict_proba(frames[2])[:, 1]
