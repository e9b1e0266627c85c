"""Click-prediction metrics: discrimination, calibration, ranking.

scikit-learn (1.4 s to import) is imported by the three functions that call it, so the registry lookups
that import this module through the gates (adrank models) do not wait for it."""

from __future__ import annotations

import math

import numpy as np
import polars as pl

ECE_BINS = 10
RANKING_CUTOFF = 10
# pairs above and below the threshold between equal-mass bins; real CTRs are 1-3%, where equal-width
# bins put nearly every pair in the first one
EQUAL_MASS_BINS = 15


def roc_auc(labels: np.ndarray, pctr: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    labels = np.asarray(labels)
    if labels.min(initial=0) == labels.max(initial=0):
        return math.nan
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, pctr))


def logloss(labels: np.ndarray, pctr: np.ndarray) -> float:
    """Mean binary cross-entropy of the predicted CTRs (natural log)."""
    if len(labels) == 0:
        return math.nan
    from sklearn.metrics import log_loss

    return float(log_loss(labels, np.clip(pctr, 1e-7, 1 - 1e-7), labels=[0, 1]))


def expected_calibration_error(labels: np.ndarray, pctr: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width pCTR bins of (share of pairs) * |mean pCTR - observed CTR|."""
    labels, pctr = np.asarray(labels, dtype=float), np.asarray(pctr, dtype=float)
    if len(labels) == 0:
        return math.nan
    which = np.minimum((pctr * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            error += in_bin.mean() * abs(pctr[in_bin].mean() - labels[in_bin].mean())
    return float(error)


def expected_calibration_error_equal_mass(
    labels: np.ndarray, pctr: np.ndarray, bins: int = EQUAL_MASS_BINS, weights: np.ndarray | None = None
) -> float:
    """Sum over bins of equal (weighted) size, by sorted pCTR, of (share of pairs) * |mean pCTR - observed CTR|."""
    labels, pctr = np.asarray(labels, dtype=float), np.asarray(pctr, dtype=float)
    if len(labels) == 0:
        return math.nan
    weights = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=float)
    order = np.argsort(pctr, kind="stable")
    cumulative = np.cumsum(weights[order])
    which = np.minimum((bins * (cumulative - weights[order]) / cumulative[-1]).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        members = order[which == b]
        w = weights[members].sum()
        if w > 0:
            gap = np.average(pctr[members], weights=weights[members]) - np.average(
                labels[members], weights=weights[members]
            )
            error += w / cumulative[-1] * abs(gap)
    return float(error)


def calibration_ratio(labels: np.ndarray, pctr: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Sum of pCTR over sum of clicks: 1.0 when the model predicts as many clicks as happened."""
    weights = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=float)
    clicks = float(np.sum(weights * np.asarray(labels, dtype=float)))
    return float(np.sum(weights * np.asarray(pctr, dtype=float)) / clicks) if clicks > 0 else math.nan


def per_group_auc(groups: np.ndarray, labels: np.ndarray, pctr: np.ndarray) -> dict:
    """AUC within each group (user) that has both classes: {group: (auc, impressions)}.

    Vectorised as the Mann-Whitney U of each group's tie-averaged ranks (equal to roc_auc_score, ties
    counting half): a day of 100k impressions has tens of thousands of users."""
    if len(groups) == 0:
        return {}
    frame = pl.DataFrame({"group": np.asarray(groups), "label": np.asarray(labels, dtype=np.int64), "pctr": pctr})
    stats = (
        frame.with_columns(rank=pl.col("pctr").rank("average").over("group"))
        .group_by("group")
        .agg(n=pl.len(), positives=pl.col("label").sum(), rank_sum=(pl.col("rank") * pl.col("label")).sum())
        .filter((pl.col("positives") > 0) & (pl.col("positives") < pl.col("n")))
        .with_columns(
            auc=(pl.col("rank_sum") - pl.col("positives") * (pl.col("positives") + 1) / 2)
            / (pl.col("positives") * (pl.col("n") - pl.col("positives")))
        )
    )
    return {group: (float(auc), int(n)) for group, auc, n in stats.select("group", "auc", "n").iter_rows()}


def ranking_lists(user_ids, shown_at) -> np.ndarray:
    """The ranked list each pair belongs to: its user on its UTC day ('u17 2026-10-21'), as the nightly rerank
    ranks each user once a day. The per-list metrics (gAUC, NDCG@10, hit rate@10) group pairs by it: a user's
    impressions on different days were never ranked against each other."""
    days = np.asarray(shown_at, dtype="datetime64[D]").astype(str)
    return np.char.add(np.char.add(np.asarray(user_ids).astype(str), " "), days)


def group_auc(groups: np.ndarray, labels: np.ndarray, pctr: np.ndarray) -> float:
    """gAUC: AUC within each group (a user's list of a day, ranking_lists) averaged over groups with both
    classes, weighted by their impressions."""
    per_group = per_group_auc(np.asarray(groups), np.asarray(labels), np.asarray(pctr))
    if not per_group:
        return math.nan
    aucs, sizes = np.array(list(per_group.values())).T
    return float(np.average(aucs, weights=sizes))


def _group_members(groups: np.ndarray) -> dict:
    """{group: indices of its members}; empty for no rows (e.g. an empty cold-start slice)."""
    if len(groups) == 0:
        return {}
    order = np.argsort(groups, kind="stable")
    keys, starts = np.unique(groups[order], return_index=True)
    return dict(zip(keys.tolist(), np.split(order, starts[1:]), strict=True))


def mean_ndcg_at_k(groups: np.ndarray, labels: np.ndarray, pctr: np.ndarray, k: int = RANKING_CUTOFF) -> float:
    """NDCG@k averaged over groups (users) with at least one click and two impressions."""
    scores = list(per_group_ndcg_at_k(np.asarray(groups), labels, pctr, k).values())
    return float(np.mean(scores)) if scores else math.nan


def per_group_ndcg_at_k(groups: np.ndarray, labels: np.ndarray, pctr: np.ndarray, k: int = RANKING_CUTOFF) -> dict:
    """{group: NDCG@k} for groups (users) with at least one click and two impressions."""
    from sklearn.metrics import ndcg_score

    return {
        group: float(ndcg_score([labels[members]], [pctr[members]], k=k))
        for group, members in _group_members(groups).items()
        if len(members) >= 2 and labels[members].any()
    }


def mean_hit_rate_at_k(groups: np.ndarray, labels: np.ndarray, pctr: np.ndarray, k: int = RANKING_CUTOFF) -> float:
    """Share of groups (users) with a click whose top-k scored impressions hold at least one click."""
    hits = []
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        if labels[members].any():
            top = members[np.argsort(-pctr[members], kind="stable")[:k]]
            hits.append(bool(labels[top].any()))
    return float(np.mean(hits)) if hits else math.nan


def metrics(labels: np.ndarray, pctr: np.ndarray, users: np.ndarray) -> dict[str, float]:
    return {
        "auc": roc_auc(labels, pctr),
        "logloss": logloss(labels, pctr),
        "ece": expected_calibration_error(labels, pctr),
        "ece_equal_mass": expected_calibration_error_equal_mass(labels, pctr),
        "calibration_ratio": calibration_ratio(labels, pctr),
        "gauc": group_auc(users, labels, pctr),
        "mean_pctr": float(np.mean(pctr)) if len(pctr) else math.nan,
        "std_pctr": float(np.std(pctr)) if len(pctr) else math.nan,
        "ndcg@10": mean_ndcg_at_k(users, labels, pctr),
        "hit_rate@10": mean_hit_rate_at_k(users, labels, pctr),
    }
