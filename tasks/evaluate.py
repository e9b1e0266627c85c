"""Evaluate a fine-tuned model against baselines on the test split, overall and on cold-start ads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from tasks.config import Settings
from tasks.metrics import metrics
from tasks.model import load_calibration, load_cross_encoder, pick_device, predict_ctr, seed_everything
from tasks.pairs import user_history

# pseudo-impressions at the global CTR added to each ad's counts in the popularity baseline
POPULARITY_PRIOR_IMPRESSIONS = 20.0
FINE_TUNED = "fine_tuned"


@dataclass
class Evaluation:
    table: pl.DataFrame  # one row per (model, slice): see evaluation_table
    test: pl.DataFrame  # the test pairs' labels and slice: is_clicked, is_cold_start
    predictions: dict[str, np.ndarray]  # model -> test pCTR, shape (test pairs,)
    train_pctr: np.ndarray  # the fine-tuned model's pCTR on a sample of training pairs (the train histogram)


def evaluate_models(
    settings: Settings,
    train_path: Path,
    test_path: Path,
    checkpoint: Path,
    other_predictions: Mapping[str, np.ndarray] | None = None,
) -> Evaluation:
    """Score the test split with the fine-tuned model, the base model with a fresh (seeded) head and
    the popularity baseline, plus any given predictions (e.g. the current champion's)."""
    test, train = pl.read_parquet(test_path), pl.read_parquet(train_path)
    # as many training pairs as test pairs: enough for a histogram at a fraction of a scoring pass
    train_sample = train.sample(min(train.height, test.height), seed=settings.training.seed)
    seed_everything(settings.training.seed)
    fine_tuned, train_pctr = score_checkpoint(settings, checkpoint, test, train_sample)  # one load for both
    seed_everything(settings.training.seed)  # the same fresh head the fine-tuning started from
    (base,) = score_checkpoint(settings, settings.model.base_model, test)
    predictions = {FINE_TUNED: fine_tuned, "base_fresh_head": base, "popularity": popularity_ctr(train, test)}
    predictions.update(other_predictions or {})
    return Evaluation(
        table=evaluation_table(test, predictions),
        test=test.select("is_clicked", "is_cold_start"),
        predictions=predictions,
        train_pctr=train_pctr,
    )


def score_checkpoint(settings: Settings, path: str | Path, *frames: pl.DataFrame) -> list[np.ndarray]:
    """pCTR of a saved model folder on each frame of pairs (ad_id, user_text, ad_text[, user prior counts]),
    loaded once, with its calibration if it has one; a base model gets a fresh head pooled as
    settings.model.pooling says."""
    model, tokenizer = load_cross_encoder(str(path), pick_device(), pooling=settings.model.pooling)
    calibration = load_calibration(path)
    return [
        predict_ctr(
            model,
            tokenizer,
            pairs["user_text"],
            pairs["ad_text"],
            settings.model.max_seq_length,
            settings.training.eval_batch_size,
            calibration,
            pairs["ad_id"].to_list(),
            user_history(pairs),
        )
        for pairs in frames
    ]


def popularity_ctr(train: pl.DataFrame, test: pl.DataFrame) -> np.ndarray:
    """Per-ad CTR over the training window, shrunk towards the global CTR; unseen ads get the global CTR."""
    global_ctr = train["is_clicked"].mean()
    per_ad = train.group_by("ad_id").agg(
        (
            (pl.col("is_clicked").sum() + POPULARITY_PRIOR_IMPRESSIONS * global_ctr)
            / (pl.len() + POPULARITY_PRIOR_IMPRESSIONS)
        ).alias("pctr")
    )
    scored = test.select("ad_id").join(per_ad, on="ad_id", how="left", maintain_order="left")
    return scored["pctr"].fill_null(global_ctr).to_numpy()


def evaluation_table(test: pl.DataFrame, predictions: Mapping[str, np.ndarray]) -> pl.DataFrame:
    """One row per (model, slice) with every metric; slices: overall and cold-start ads."""
    labels = test["is_clicked"].cast(pl.Int8).to_numpy()
    users = test["user_id"].to_numpy()
    masks = {"overall": np.ones(len(labels), dtype=bool), "cold_start": test["is_cold_start"].to_numpy()}
    rows = []
    for model_name, pctr in predictions.items():
        for slice_name, mask in masks.items():
            row = {
                "model": model_name,
                "slice": slice_name,
                "pairs": int(mask.sum()),
                "clicks": int(labels[mask].sum()),
            }
            rows.append(row | metrics(labels[mask], pctr[mask], users[mask]))
    return pl.DataFrame(rows)


def to_markdown(table: pl.DataFrame) -> str:
    """The evaluation table as Markdown, floats to 4 places."""
    rounded = table.with_columns(pl.col(pl.Float64).round(4))
    with pl.Config(
        tbl_formatting="MARKDOWN",
        tbl_hide_column_data_types=True,
        tbl_hide_dataframe_shape=True,
        tbl_rows=-1,
        tbl_cols=-1,
        tbl_width_chars=400,
        fmt_str_lengths=100,
    ):
        return str(rounded)
