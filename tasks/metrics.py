"""Click-prediction metrics: discrimination, calibration, ranking."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import log_loss, ndcg_score, roc_auc_score

ECE_BINS = 10
RANKING_CUTOFF = 10


def roc_auc(labels: np.ndarray, pctr: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    labels = np.asarray(labels)
    if labels.min(initial=0) == labels.max(initial=0):
        return math.nan
    return float(roc_auc_score(labels, pctr))


def logloss(labels: np.ndarray, pctr: np.ndarray) -> float:
    """Mean binary cross-entropy of the predicted CTRs (natural log)."""
    if len(labels) == 0:
        return math.nan
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


def mean_ndcg_at_k(groups: np.ndarray, labels: np.ndarray, pctr: np.ndarray, k: int = RANKING_CUTOFF) -> float:
    """NDCG@k averaged over groups (users) with at least one click and two impressions."""
    scores = []
    for group in np.unique(groups):
        members = groups == group
        if members.sum() >= 2 and labels[members].any():
            scores.append(ndcg_score([labels[members]], [pctr[members]], k=k))
    return float(np.mean(scores)) if scores else math.nan


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
        "mean_pctr": float(np.mean(pctr)) if len(pctr) else math.nan,
        "std_pctr": float(np.std(pctr)) if len(pctr) else math.nan,
        "ndcg@10": mean_ndcg_at_k(users, labels, pctr),
        "hit_rate@10": mean_hit_rate_at_k(users, labels, pctr),
    }
