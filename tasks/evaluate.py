"""Evaluate a fine-tuned model against baselines on the test split, overall and on the slices that matter:
the users rerank ranks that day, cold ads, ads new since training and users without history."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from tasks.config import Settings
from tasks.metrics import metrics, ranking_lists
from tasks.output_layer import PairPriors, load_calibration

# pseudo-impressions at the global CTR added to each ad's counts in the popularity baseline
POPULARITY_PRIOR_IMPRESSIONS = 20.0
FINE_TUNED = "fine_tuned"
# what each slice holds (columns of sql/int_user_ad_pairs.sql): ranked_users, the users the nightly rerank ranks
# that day (the product's population); cold_start, ads never shown before the day (no count, no history
# mention, no training pair); new_ads, ads first shown after the training window (the fine-tuned model never
# saw them, but rerank may have counted their first days); users_without_history, no impression before the day
SLICES = ("overall", "ranked_users", "cold_start", "new_ads", "users_without_history")
SLICE_COLUMNS = (
    *("user_id", "shown_at", "is_clicked"),
    *("is_ranked_user", "is_cold_start", "is_new_ad", "user_prior_impressions"),
)


@dataclass
class Evaluation:
    table: pl.DataFrame  # one row per (model, slice): see evaluation_table
    test: pl.DataFrame  # the test pairs' users, labels and slices: SLICE_COLUMNS
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
    from tasks.model import seed_everything  # torch: imported by the runs that score, not by lookups

    test, train = pl.read_parquet(test_path), pl.read_parquet(train_path)
    # as many training pairs as test pairs: enough for a histogram at a fraction of a scoring pass
    train_sample = train.sample(min(train.height, test.height), seed=settings.training.seed)
    seed_everything(settings.training.seed)
    # one load for both; the shown ads' texts (the affinity term) from beside the test pairs
    fine_tuned, train_pctr = score_checkpoint(settings, checkpoint, test, train_sample, ads_dir=test_path.parent)
    seed_everything(settings.training.seed)  # the same fresh head the fine-tuning started from
    (base,) = score_checkpoint(settings, settings.model.base_model, test)
    predictions = {FINE_TUNED: fine_tuned, "base_fresh_head": base, "popularity": popularity_ctr(train, test)}
    predictions.update(other_predictions or {})
    return Evaluation(
        table=evaluation_table(test, predictions),
        test=test.select(SLICE_COLUMNS),
        predictions=predictions,
        train_pctr=train_pctr,
    )


def score_checkpoint(
    settings: Settings, path: str | Path, *frames: pl.DataFrame, ads_dir: Path | None = None
) -> list[np.ndarray]:
    """pCTR of a saved model folder on each frame of pairs (user_text, ad_text[, prior counts][, shown ads]),
    loaded once, with its calibration if it has one; a base model gets a fresh head pooled as
    settings.model.pooling says. ads_dir: where the pairs' ad texts are (tasks/pairs.py read_ad_texts), read
    when the model's output layer has the affinity term."""
    from tasks.model import load_cross_encoder, pick_device, predict_ctr
    from tasks.pairs import read_ad_texts
    from tasks.semantic_match import saved_match_encoder, with_served_match

    device, max_length, batch_size = pick_device(), settings.model.max_seq_length, settings.training.eval_batch_size
    model, tokenizer = load_cross_encoder(str(path), device, pooling=settings.model.pooling)
    calibration = load_calibration(path)
    match_encoder = saved_match_encoder(path, device, max_length, batch_size)
    bandwidth, ads = None, None
    if calibration.uses_affinity:
        if ads_dir is None:
            raise ValueError(f"{path}: its output layer weighs the affinity term: the ad texts (ads_dir) are needed")
        bandwidth, ads = calibration.affinity_bandwidth, read_ad_texts(ads_dir)
    return [
        predict_ctr(
            model,
            tokenizer,
            pairs["user_text"],
            pairs["ad_text"],
            max_length,
            batch_size,
            calibration,
            PairPriors.of(with_served_match(pairs, match_encoder, bandwidth, ads)),
        )
        for pairs in frames
    ]


def popularity_ctr(train: pl.DataFrame, pairs: pl.DataFrame) -> np.ndarray:
    """Each pair's ad CTR over the logs before the pair's day (its point-in-time counts: what a nightly
    popularity ranker knows), shrunk towards train's CTR; cold ads get train's CTR."""
    global_ctr = train["is_clicked"].cast(pl.Float64).mean()
    clicks, impressions = (pairs[c].cast(pl.Float64).to_numpy() for c in ("ad_prior_clicks", "ad_prior_impressions"))
    return (clicks + POPULARITY_PRIOR_IMPRESSIONS * global_ctr) / (impressions + POPULARITY_PRIOR_IMPRESSIONS)


def slice_masks(test: pl.DataFrame) -> dict[str, np.ndarray]:
    """Slice name (SLICES) -> boolean mask over the test pairs."""
    return {
        "overall": np.ones(test.height, dtype=bool),
        "ranked_users": test["is_ranked_user"].to_numpy(),
        "cold_start": test["is_cold_start"].to_numpy(),
        "new_ads": test["is_new_ad"].to_numpy(),
        "users_without_history": (test["user_prior_impressions"] == 0).to_numpy(),
    }


def evaluation_table(test: pl.DataFrame, predictions: Mapping[str, np.ndarray]) -> pl.DataFrame:
    """One row per (model, slice) with every metric; slices: SLICES."""
    labels = test["is_clicked"].cast(pl.Int8).to_numpy()
    lists = ranking_lists(test["user_id"], test["shown_at"])  # gAUC and NDCG within each user's day
    masks = slice_masks(test)
    rows = []
    for model_name, pctr in predictions.items():
        for slice_name, mask in masks.items():
            row = {
                "model": model_name,
                "slice": slice_name,
                "pairs": int(mask.sum()),
                "clicks": int(labels[mask].sum()),
            }
            rows.append(row | metrics(labels[mask], pctr[mask], lists[mask]))
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
