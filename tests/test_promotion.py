"""The promotion gates (tasks/gates.py) on test splits whose models differ by construction."""

import re
from datetime import datetime

import numpy as np
import polars as pl
import pytest

from tasks.config import PromotionConfig
from tasks.evaluate import FINE_TUNED, Evaluation, evaluation_table
from tasks.gates import promotion_gates
from tasks.registry import Champion, champion_gives_way

GATES = ["popularity", "champion", "trained", "logloss", "calibration", "pctr_spread", "mean_pctr", "smoke"]
FAST = PromotionConfig(bootstrap_replicates=200)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


@pytest.fixture(scope="module")
def market() -> dict:
    """300 users x 12 impressions: clicks drawn from ad quality + user propensity + a user-ad match that only
    a text model reads. The models: truth (all three), popularity (ad quality only), priors (ad quality and
    the user: each user's ads in popularity's order), noise (a text term that knows nothing, no priors)."""
    rng = np.random.default_rng(4)
    n_users, per_user = 300, 12
    users = np.repeat([f"u{i:03d}" for i in range(n_users)], per_user)
    n = len(users)
    ad_quality = rng.normal(0, 1, 40)[rng.integers(0, 40, n)]
    propensity = np.repeat(rng.normal(0, 1, n_users), per_user)
    match = rng.normal(0, 1, n)
    truth = sigmoid(-1.0 + ad_quality + propensity + 1.5 * match)
    labels = rng.random(n) < truth
    test = pl.DataFrame(
        {
            "user_id": users,
            "shown_at": [datetime(2026, 5, 1, 9)] * n,  # one day: each user's impressions are one ranked list
            "is_clicked": labels,
            "is_ranked_user": np.repeat(rng.random(n_users) < 0.6, per_user),
            "is_cold_start": rng.random(n) < 0.1,
            "is_new_ad": rng.random(n) < 0.2,
            "user_prior_impressions": np.repeat(rng.integers(0, 20, n_users), per_user),
        }
    )
    # what is left unknown averaged out (the probit approximation), so that each model is calibrated
    blur = lambda variance: np.sqrt(1 + np.pi * variance / 8)  # noqa: E731
    models = {
        "truth": truth,
        "popularity": sigmoid((-1.0 + ad_quality) / blur(1 + 1.5**2)),
        "priors": sigmoid((-1.0 + ad_quality + propensity) / blur(1.5**2)),
        "noise": sigmoid(-0.6 + rng.normal(0, 1, n)),
    }
    return {"test": test, "models": models}


def evaluation(market: dict, candidate: str, champion: str | None = None, scale: float = 1.0) -> Evaluation:
    """The test split scored by the candidate (pCTR times scale), popularity and maybe a champion."""
    models = market["models"]
    predictions = {FINE_TUNED: np.clip(models[candidate] * scale, 1e-6, 1 - 1e-6), "popularity": models["popularity"]}
    if champion is not None:
        predictions["champion"] = models[champion]
    test = market["test"]
    return Evaluation(evaluation_table(test, predictions), test, predictions, np.zeros(1))


def failed(gates) -> set[str]:
    assert [g.name for g in gates] == GATES and all(g.detail for g in gates)
    return {g.name for g in gates if not g.passed}


def test_a_good_first_model_passes_every_gate(market):
    assert failed(promotion_gates(evaluation(market, "truth"), 40, None, FAST)) == set()


def test_a_text_term_that_ranks_worse_than_popularity_is_held(market):
    gates = promotion_gates(evaluation(market, "noise"), 40, None, FAST)
    assert "popularity" in failed(gates)
    assert "worse beyond the noise on auc (overall), gauc (overall)" in gates[0].detail


def test_the_priors_alone_tie_popularity_on_each_users_order_and_pass(market):
    gates = promotion_gates(evaluation(market, "priors"), 0, None, FAST)  # kept step 0: the priors alone
    assert failed(gates) == set()
    same_order = r"overall gauc [-+]0\.0000 \[[-+]0\.0000, [-+]0\.0000\]"  # the same order within each user
    assert re.search(same_order, gates[0].detail), gates[0].detail
    assert "kept step 0" in gates[2].detail


def test_against_a_champion_only_a_difference_beyond_the_noise_promotes(market):
    twins = promotion_gates(evaluation(market, "truth", champion="truth"), 40, None, FAST)
    assert failed(twins) == {"champion"} and "not better than the champion beyond the noise" in twins[1].detail
    better = promotion_gates(evaluation(market, "truth", champion="priors"), 40, None, FAST)
    assert failed(better) == set() and "better than the champion beyond the noise on auc (overall)" in better[1].detail
    worse = promotion_gates(evaluation(market, "priors", champion="truth"), 40, None, FAST)
    assert "champion" in failed(worse) and "worse than the champion beyond the noise" in worse[1].detail
    margin = PromotionConfig(bootstrap_replicates=200, min_gain=0.5)  # no real model gains half an AUC
    assert "champion" in failed(promotion_gates(evaluation(market, "truth", champion="priors"), 40, None, margin))


def test_a_model_that_kept_step_0_never_replaces_a_working_champion(market):
    kept_zero = evaluation(market, "truth", champion="priors")
    assert failed(promotion_gates(kept_zero, 0, None, FAST)) == {"trained"}
    stale = "champion version 3 is stale: its logs ended 2026-11-01 00:00"
    assert failed(promotion_gates(kept_zero, 0, None, FAST, champion_yields=stale)) == {"trained"}
    broken = "champion version 3 cannot be loaded or scored: OSError"  # then the priors beat no model at all
    assert failed(promotion_gates(evaluation(market, "truth"), 0, None, FAST, champion_yields=broken)) == set()


@pytest.mark.parametrize(
    ("scale", "smoke", "expected"),
    [
        (2.0, None, {"logloss", "calibration", "mean_pctr"}),  # twice the clicks it should: miscalibrated
        (0.0, None, {"popularity", "logloss", "calibration", "pctr_spread", "mean_pctr"}),  # a constant
        (1.0, "scores outside (0, 1)", {"smoke"}),
    ],
)
def test_the_absolute_gates(market, scale, smoke, expected):
    assert failed(promotion_gates(evaluation(market, "truth", scale=scale), 40, smoke, FAST)) == expected


def test_an_undefined_auc_never_promotes(market):
    one_class = market | {"test": market["test"].with_columns(is_clicked=pl.lit(False))}
    gates = promotion_gates(evaluation(one_class, "truth"), 40, None, FAST)
    assert "popularity" in failed(gates) and "undefined" in gates[0].detail


NOW = datetime(2026, 11, 30)


@pytest.mark.parametrize(
    ("champion", "max_age", "expected"),
    [
        (None, 14, None),  # no champion: nothing to yield
        (Champion("3", np.ones(2), None, datetime(2026, 11, 20)), 14, None),  # 10 days old: still compared
        (Champion("3", np.ones(2), None, datetime(2026, 11, 1)), 14, "champion version 3 is stale"),
        (Champion("3", np.ones(2), None, datetime(2026, 11, 1)), None, None),  # staleness off
        (Champion("3", np.ones(2), None, None), 14, None),  # registered before data.until was kept
        (Champion("3", None, "version 3 cannot be loaded or scored: OSError", NOW), 14, "cannot be loaded"),
    ],
)
def test_a_stale_or_unloadable_champion_gives_way(champion, max_age, expected):
    reason = champion_gives_way(champion, NOW, PromotionConfig(max_champion_age_days=max_age))
    assert reason is None if expected is None else expected in reason


def test_a_champion_that_gives_way_waives_only_the_comparison(market):
    stale = "champion version 3 is stale"
    gates = promotion_gates(evaluation(market, "priors", champion="truth"), 40, None, FAST, champion_yields=stale)
    assert failed(gates) == set() and stale in gates[1].detail  # worse than the champion, promoted anyway
    worse = promotion_gates(evaluation(market, "truth", scale=2.0), 40, None, FAST, champion_yields=stale)
    assert {"calibration", "mean_pctr"} <= failed(worse)  # the absolute gates still hold
