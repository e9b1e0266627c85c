"""The quality benchmark's protocol: cold items held out of the logs, the time split, paired intervals.

Kept apart from benchmarks/quality.py (which trains and reports) so that each rule is tested on its own.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.metrics import log_loss, roc_auc_score

from tasks.metrics import calibration_ratio, expected_calibration_error_equal_mass, per_group_auc, per_group_ndcg_at_k
from tasks.pairs import build_pairs

COLD_ITEM_SHARE = 0.10
# higher is better for these; lower for logloss and ECE; calibration ratio: closest to 1
HIGHER_IS_BETTER = ("gauc", "auc", "ndcg@10")
INTERVAL_METRICS = ("gauc", "auc", "ndcg@10", "logloss", "ece_equal_mass", "calibration_ratio")


def hold_out_items(logs: Path, out: Path, seed: int, test_from: datetime) -> list[str]:
    """Copy the logs to out without any impression of a seeded COLD_ITEM_SHARE of the ads before test_from.

    Pairs built from out never see a held-out ad in training or validation: not as a pair, not in a
    user's history text, not in a prior count. Their test impressions stay: the cold slice.
    """
    impressions = pl.read_parquet(logs / "impressions")
    items = np.sort(impressions["ad_id"].cast(pl.String).unique().to_numpy())
    cold = np.random.default_rng(seed).choice(items, size=max(1, round(COLD_ITEM_SHARE * len(items))), replace=False)
    cold = sorted(cold.tolist())
    held_out = pl.col("ad_id").cast(pl.String).is_in(cold) & (pl.col("ts") < test_from)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(logs, out, ignore=shutil.ignore_patterns("impressions"))
    (out / "impressions").mkdir()
    impressions.filter(~held_out).write_parquet(out / "impressions" / "part-0.parquet")
    return cold


def time_split_pairs(settings, valid_from: datetime, test_from: datetime) -> dict[str, pl.DataFrame]:
    """adrank's pairs of settings.data.logs, split at the cutoffs of the full logs (so every seed has the same
    test impressions), with is_cold_start = the ad has no pair in train or valid."""
    built = build_pairs(settings)
    pairs = pl.concat([pl.read_parquet(path) for path in built.paths.values()]).with_columns(
        pl.when(pl.col("shown_at") >= test_from)
        .then(pl.lit("test"))
        .when(pl.col("shown_at") >= valid_from)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
        .alias("split")
    )
    seen = pairs.filter(pl.col("split") != "test")["ad_id"].unique().implode()
    pairs = pairs.with_columns((~pl.col("ad_id").is_in(seen)).alias("is_cold_start"))
    return {name: pairs.filter(pl.col("split") == name).sort("shown_at", "impression_id") for name in built.paths}


def best_peer(means: dict[str, dict[str, dict[str, float]]], peers: list[str], metric: str, slice_name: str) -> str:
    """The peer with the best mean value of metric on slice_name."""

    def goodness(peer: str) -> float:
        value = means[peer][slice_name][metric]
        if metric == "calibration_ratio":
            return -abs(value - 1)
        return value if metric in HIGHER_IS_BETTER else -value

    return max(peers, key=goodness)


def paired_bootstrap(
    runs: list[dict], model: str, peer: str, slice_name: str, metric: str, replicates: int, seed: int
) -> tuple[float, float]:
    """95% interval of (model - peer) on metric, averaged over the runs (seeds), resampling users.

    Each run: {"test": the test pairs (user_id, is_clicked, is_cold_start), "predictions": {model: pCTR}}.
    Users are drawn with replacement (the same draw for every run: the test users are the same), so
    the pairs of one user stay together and per-user metrics (gAUC, NDCG) resample as users. For the
    calibration ratio the difference is of |ratio - 1|: below 0, the model is the closer to 1.
    """
    users = np.unique(np.concatenate([run["test"]["user_id"].to_numpy() for run in runs]))
    rng = np.random.default_rng(seed)
    prepared = [_prepare(run, [model, peer], slice_name, metric, users) for run in runs]
    differences = []
    for _ in range(replicates):
        draws = rng.multinomial(len(users), np.full(len(users), 1 / len(users)))
        per_run = [_score(p, model, metric, draws) - _score(p, peer, metric, draws) for p in prepared]
        differences.append(np.mean(per_run))
    low, high = np.nanpercentile(differences, [2.5, 97.5])
    return float(low), float(high)


def _prepare(run: dict, models: list[str], slice_name: str, metric: str, users: np.ndarray) -> dict:
    test = run["test"]
    mask = np.ones(test.height, bool) if slice_name == "overall" else test["is_cold_start"].to_numpy()
    user_index = np.searchsorted(users, test["user_id"].to_numpy()[mask])
    labels = test["is_clicked"].cast(pl.Int8).to_numpy()[mask]
    prepared = {"user_index": user_index, "labels": labels, "pctr": {}, "per_user": {}}
    for name in models:
        pctr = run["predictions"][name][mask]
        prepared["pctr"][name] = pctr
        groups = test["user_id"].to_numpy()[mask]
        if metric == "gauc":
            per_user = per_group_auc(groups, labels, pctr)  # {user: (auc, impressions)}
            prepared["per_user"][name] = {np.searchsorted(users, u): v for u, v in per_user.items()}
        elif metric == "ndcg@10":
            per_user = per_group_ndcg_at_k(groups, labels, pctr)
            prepared["per_user"][name] = {np.searchsorted(users, u): (v, 1) for u, v in per_user.items()}
    return prepared


def _score(prepared: dict, name: str, metric: str, draws: np.ndarray) -> float:
    value = _weighted(prepared, name, metric, draws)
    return abs(value - 1) if metric == "calibration_ratio" else value


def _weighted(prepared: dict, name: str, metric: str, draws: np.ndarray) -> float:
    """metric of model `name` with each user's pairs counted draws[user] times."""
    if metric in ("gauc", "ndcg@10"):
        per_user = prepared["per_user"][name]
        index = np.fromiter(per_user, dtype=int)
        values, sizes = np.array(list(per_user.values())).T
        weights = draws[index] * sizes
        return float(np.average(values, weights=weights)) if weights.sum() > 0 else np.nan
    weights = draws[prepared["user_index"]].astype(float)
    labels, pctr = prepared["labels"], prepared["pctr"][name]
    if metric == "auc":
        return float(roc_auc_score(labels, pctr, sample_weight=weights))
    if metric == "logloss":
        return float(log_loss(labels, np.clip(pctr, 1e-7, 1 - 1e-7), sample_weight=weights, labels=[0, 1]))
    if metric == "ece_equal_mass":
        return expected_calibration_error_equal_mass(labels, pctr, weights=weights)
    return calibration_ratio(labels, pctr, weights)
