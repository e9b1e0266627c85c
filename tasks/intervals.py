"""How sure is a difference? Paired user-level bootstrap intervals of (model - baseline) on a metric.

Users are drawn with replacement, so each user's pairs stay together and per-user metrics (gAUC, NDCG)
resample as users; both models are scored on the same draw (paired). Several test sets (one per seed of a
benchmark, sharing their test users) share each draw and their differences are averaged. The promotion
gates, the kept step's validation gain (tasks/train.py) and the quality benchmark all use this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tasks.metrics import calibration_ratio, expected_calibration_error_equal_mass, per_group_auc, per_group_ndcg_at_k

# higher is better for these; lower for logloss and ECE; calibration ratio: closest to 1
HIGHER_IS_BETTER = ("gauc", "auc", "ndcg@10")
INTERVAL_METRICS = ("gauc", "auc", "ndcg@10", "logloss", "ece_equal_mass", "calibration_ratio")
CONFIDENCE = 0.95
LOGLOSS_CLIP = 1e-7  # as tasks/metrics.py logloss


@dataclass(frozen=True)
class Scored:
    """One set of pairs scored by several models: users (what is resampled), labels, {model: pCTR} and the
    groups the per-group metrics (gAUC, NDCG@10) are computed in (tasks/metrics.py ranking_lists; None: the
    users), rows aligned."""

    users: np.ndarray
    labels: np.ndarray
    pctr: dict[str, np.ndarray]
    groups: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> Scored:
        """The pairs of a slice (a boolean mask or an index)."""
        groups = None if self.groups is None else self.groups[rows]
        return Scored(self.users[rows], self.labels[rows], {m: p[rows] for m, p in self.pctr.items()}, groups)


@dataclass(frozen=True)
class Interval:
    """(model - baseline) on a metric: its value on the data as it is (mean over sets) and a 95% interval.
    For the calibration ratio the difference is of |ratio - 1| (below 0: the model is the closer to 1)."""

    mean: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"mean": self.mean, "interval": [self.low, self.high]}

    def __str__(self) -> str:
        if math.isnan(self.mean):
            return "n/a (too few pairs or one class)"
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def beyond_the_noise(gains: dict[str, Interval], better: bool) -> list[str]:
    """The metrics whose (model - baseline) interval excludes 0 in the model's favour (better) or against it:
    above 0 for HIGHER_IS_BETTER metrics, below 0 for the others. A NaN interval is neither."""
    # the interval lies wholly above 0 where the sought direction is up (a better AUC, a worse logloss)
    return [m for m, g in gains.items() if (g.low > 0 if (m in HIGHER_IS_BETTER) == better else g.high < 0)]


def paired_interval(
    sets: list[Scored], model: str, baseline: str, metric: str, replicates: int, seed: int = 0
) -> Interval:
    """The difference model - baseline on metric, averaged over sets, with its paired bootstrap interval.
    NaN throughout when a set has too little data for the metric (e.g. a slice with one class)."""
    users = np.unique(np.concatenate([s.users for s in sets]))
    if len(users) == 0:  # an empty slice (no cold ads in a test split, no user rerank ranked)
        return Interval(math.nan, math.nan, math.nan)
    prepared = [_prepare(s, (model, baseline), metric, users) for s in sets]
    everyone = np.ones(len(users))
    mean = float(np.mean([_difference(p, model, baseline, metric, everyone) for p in prepared]))
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(replicates):
        draws = rng.multinomial(len(users), np.full(len(users), 1 / len(users))).astype(float)
        differences.append(np.mean([_difference(p, model, baseline, metric, draws) for p in prepared]))
    finite = np.asarray(differences)[np.isfinite(differences)]
    if math.isnan(mean) or len(finite) < replicates / 2:
        return Interval(math.nan, math.nan, math.nan)
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(mean, float(low), float(high))


def _prepare(scored: Scored, models: tuple[str, str], metric: str, users: np.ndarray) -> dict:
    prepared = {"user_index": np.searchsorted(users, scored.users), "labels": scored.labels.astype(np.int8)}
    prepared["pctr"] = {name: scored.pctr[name] for name in models}
    # each pair's rank among the distinct scores, for the weighted AUC of every draw (_weighted_auc)
    prepared["score_rank"] = {name: np.unique(scored.pctr[name], return_inverse=True)[1] for name in models}
    clipped = {name: np.clip(scored.pctr[name], LOGLOSS_CLIP, 1 - LOGLOSS_CLIP) for name in models}
    labels = prepared["labels"]
    prepared["pair_logloss"] = {n: -np.where(labels == 1, np.log(p), np.log(1 - p)) for n, p in clipped.items()}
    groups = scored.users if scored.groups is None else scored.groups
    owner = dict(zip(groups.tolist(), scored.users.tolist(), strict=True))  # each group's user: drawn with them
    per_group = {}
    for name in models:
        if metric == "gauc":
            values = per_group_auc(groups, prepared["labels"], scored.pctr[name])  # {group: (auc, n)}
        elif metric == "ndcg@10":
            ndcg = per_group_ndcg_at_k(groups, prepared["labels"], scored.pctr[name])
            values = {group: (value, 1) for group, value in ndcg.items()}
        else:
            continue
        index = np.searchsorted(users, np.asarray([owner[g] for g in values], dtype=users.dtype))
        per_group[name] = (index, *(np.array(list(values.values()), dtype=float).reshape(-1, 2).T))
    prepared["per_group"] = per_group
    return prepared


def _difference(prepared: dict, model: str, baseline: str, metric: str, draws: np.ndarray) -> float:
    model_value, baseline_value = (_weighted(prepared, name, metric, draws) for name in (model, baseline))
    if metric == "calibration_ratio":
        return abs(model_value - 1) - abs(baseline_value - 1)
    return model_value - baseline_value


def _weighted_auc(score_rank: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """AUC with each pair counted weights times (sklearn's roc_auc_score with sample_weight, ties counting
    half), from the pairs' ranks among the distinct scores: O(pairs) a draw, no sort."""
    groups = int(score_rank.max(initial=-1)) + 1
    positive = np.bincount(score_rank, weights=weights * labels, minlength=groups)
    negative = np.bincount(score_rank, weights=weights * (1 - labels), minlength=groups)
    total_positive, total_negative = positive.sum(), negative.sum()
    if total_positive == 0 or total_negative == 0:
        return math.nan
    below = np.cumsum(negative) - negative  # negatives scored strictly lower than each group
    return float(np.sum(positive * (below + 0.5 * negative)) / (total_positive * total_negative))


def _weighted(prepared: dict, name: str, metric: str, draws: np.ndarray) -> float:
    """metric of model `name` with each user's pairs counted draws[user] times."""
    if metric in ("gauc", "ndcg@10"):
        index, values, sizes = prepared["per_group"][name]
        weights = draws[index.astype(int)] * sizes
        return float(np.average(values, weights=weights)) if weights.sum() > 0 else math.nan
    weights = draws[prepared["user_index"]]
    labels, pctr = prepared["labels"], prepared["pctr"][name]
    kept = weights > 0
    if metric == "auc":
        return _weighted_auc(prepared["score_rank"][name], labels, weights)
    if metric == "logloss":
        return float(np.average(prepared["pair_logloss"][name], weights=weights)) if weights.sum() > 0 else math.nan
    if metric == "ece_equal_mass":
        return expected_calibration_error_equal_mass(labels[kept], pctr[kept], weights=weights[kept])
    return calibration_ratio(labels, pctr, weights)
