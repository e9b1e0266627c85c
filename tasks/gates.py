"""Promotion gates: every check a registered version must pass to become champion, each with its reason.

All are judged on the test split, which neither the challenger nor (when the logs only grew) the champion
was fitted or chosen on. Where two models are compared the question is whether the difference is beyond
the noise: a 95% paired user-bootstrap interval (tasks/intervals.py) on AUC and gAUC, overall and on the
users rerank ranks (ranked_users).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from tasks.config import PromotionConfig
from tasks.evaluate import FINE_TUNED, Evaluation, slice_masks
from tasks.intervals import Interval, Scored, paired_interval
from tasks.metrics import ranking_lists

CHAMPION, POPULARITY = "champion", "popularity"
COMPARED_METRICS = ("auc", "gauc")
COMPARED_SLICES = ("overall", "ranked_users")


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    detail: str


def promotion_gates(
    evaluation: Evaluation,
    kept_step: int,
    smoke_error: str | None,
    cfg: PromotionConfig,
    champion_yields: str | None = None,
) -> list[Gate]:
    """Every gate, in order: popularity, champion, trained, logloss, calibration, pctr_spread, mean_pctr,
    smoke. The champion is compared when evaluation.predictions holds its pCTR on the same test split;
    champion_yields (a champion that is stale or cannot be loaded, tasks/registry.py) waives that."""
    overall = {r["model"]: r for r in evaluation.table.filter(pl.col("slice") == "overall").iter_rows(named=True)}
    candidate, has_champion = overall[FINE_TUNED], CHAMPION in evaluation.predictions
    versus = {name: comparisons(evaluation, name, cfg.bootstrap_replicates) for name in (POPULARITY, CHAMPION)}
    gates = [
        popularity_gate(candidate, versus[POPULARITY]),
        champion_gate(versus[CHAMPION], cfg, champion_yields, has_champion),
        trained_gate(kept_step, has_champion or champion_yields is not None, champion_yields),
    ]
    popularity = overall[POPULARITY]
    logloss_ok = candidate["logloss"] <= popularity["logloss"] + cfg.max_logloss_gap
    gates.append(
        Gate(
            "logloss",
            logloss_ok,
            f"logloss {candidate['logloss']:.4f} vs popularity {popularity['logloss']:.4f} + {cfg.max_logloss_gap}",
        )
    )
    gates.append(Gate("calibration", candidate["ece"] <= cfg.max_ece, f"ECE {candidate['ece']:.4f} <= {cfg.max_ece}?"))
    spread = candidate["std_pctr"]
    gates.append(Gate("pctr_spread", spread >= cfg.min_pctr_std, f"pCTR std {spread:.2e} >= {cfg.min_pctr_std:.0e}?"))
    observed = candidate["clicks"] / candidate["pairs"]
    error = abs(candidate["mean_pctr"] - observed) / max(observed, 1e-9)
    gates.append(
        Gate(
            "mean_pctr",
            error <= cfg.max_mean_pctr_error,
            f"mean pCTR {candidate['mean_pctr']:.4f} vs observed CTR {observed:.4f} "
            f"(relative error {error:.2f} <= {cfg.max_mean_pctr_error}?)",
        )
    )
    gates.append(Gate("smoke", smoke_error is None, smoke_error or "scores the fixed examples"))
    return gates


def comparisons(evaluation: Evaluation, baseline: str, replicates: int) -> dict[tuple[str, str], Interval]:
    """(slice, metric) -> interval of fine_tuned - baseline on the test split; empty without the baseline."""
    if baseline not in evaluation.predictions:
        return {}
    test = evaluation.test
    scored = Scored(
        test["user_id"].cast(pl.String).to_numpy(),
        test["is_clicked"].cast(pl.Int8).to_numpy(),
        {name: np.asarray(evaluation.predictions[name]) for name in (FINE_TUNED, baseline)},
        ranking_lists(test["user_id"], test["shown_at"]),
    )
    masks = slice_masks(test)
    return {
        (name, metric): paired_interval([scored.take(masks[name])], FINE_TUNED, baseline, metric, replicates)
        for name in COMPARED_SLICES
        for metric in COMPARED_METRICS
    }


def popularity_gate(candidate: dict, versus: dict[tuple[str, str], Interval]) -> Gate:
    """The model must not lose to popularity beyond the noise: no interval of (model - popularity) on AUC or
    gAUC, overall or on ranked users, lies wholly below 0. The priors alone order each user's ads as
    popularity does (a tie on gAUC, passing); a text term that ranks worse than popularity does not pass."""
    if math.isnan(candidate["auc"]):
        return Gate("popularity", False, "candidate AUC is undefined (the test split has one class)")
    losing = [key for key, interval in versus.items() if interval.high < 0]
    verdict = f"worse beyond the noise on {_named(losing)}" if losing else "not worse beyond the noise"
    return Gate("popularity", not losing, f"vs popularity: {verdict}; {_listed(versus)}")


def champion_gate(
    versus: dict[tuple[str, str], Interval], cfg: PromotionConfig, champion_yields: str | None, has_champion: bool
) -> Gate:
    """Against a champion: better beyond the noise overall (an AUC or gAUC interval's lower end above
    promotion.min_gain), and worse beyond the noise nowhere (no interval wholly below 0)."""
    if champion_yields is not None:
        return Gate("champion", True, f"not compared: {champion_yields}")
    if not has_champion:
        return Gate("champion", True, "no champion yet")
    better = [(s, m) for (s, m), i in versus.items() if s == "overall" and i.low > cfg.min_gain]
    worse = [key for key, interval in versus.items() if interval.high < 0]
    if worse:
        verdict = f"worse than the champion beyond the noise on {_named(worse)}"
    elif better:
        verdict = f"better than the champion beyond the noise on {_named(better)}"
    else:
        verdict = f"not better than the champion beyond the noise (lower end above {cfg.min_gain} wanted)"
    return Gate("champion", bool(better) and not worse, f"{verdict}; {_listed(versus)}")


def trained_gate(kept_step: int, champion_exists: bool, champion_yields: str | None) -> Gate:
    """A model whose fine-tuning never beat the priors alone (kept step 0, served without text) may become
    the first champion, or replace one that cannot be loaded, but never replaces a working champion."""
    if kept_step > 0:
        return Gate("trained", True, f"kept step {kept_step}")
    priors_only = "kept step 0: no trained step beat the priors alone on validation, so it serves them without text"
    broken = champion_yields is not None and "cannot be loaded" in champion_yields
    if champion_exists and not broken:
        return Gate("trained", False, f"{priors_only}; never replaces a champion")
    return Gate("trained", True, priors_only)


def _named(keys: list[tuple[str, str]]) -> str:
    return ", ".join(f"{metric} ({slice_name})" for slice_name, metric in keys)


def _listed(versus: dict[tuple[str, str], Interval]) -> str:
    return ", ".join(f"{slice_name} {metric} {interval}" for (slice_name, metric), interval in versus.items())
