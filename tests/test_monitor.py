"""Next-day monitoring: metrics per slice, drift, thresholds (plain functions)."""

from __future__ import annotations

import hashlib
import math
from datetime import date, datetime

import numpy as np
import polars as pl
import pytest

from tasks.config import MonitorConfig, load_settings
from tasks.monitor import (
    DEGRADED_EVENT,
    OfflineMetrics,
    binary_entropy,
    breaches,
    daily_metrics,
    degraded_event,
    input_drift,
    offline_metrics,
    psi,
    psi_categorical,
    slices,
)

DAY = date(2026, 5, 12)
TRAINED_UNTIL = datetime(2026, 5, 9)  # the version's training window ended here: later ads are new to it


def day_frame() -> pl.DataFrame:
    """Six impressions of two users, hand-checkable."""
    return pl.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", "u2", "u2", "u2"],
            "ad_id": ["a", "b", "new", "a", "b", "new"],
            "is_clicked": [True, False, False, True, False, True],
            "pctr": [0.9, 0.2, 0.1, 0.6, 0.5, 0.4],
            "in_top_n": [True, True, False, True, False, False],
            "user_prior_impressions": [0, 0, 0, 5, 5, 5],
            "is_ranked_user": [False, False, False, True, True, True],
            "is_cold_start": [False, False, True, False, False, True],
            "ad_first_shown_at": [datetime(2026, 5, 1)] * 2
            + [datetime(2026, 5, 12)]
            + [datetime(2026, 5, 1)] * 2
            + [datetime(2026, 5, 12)],
            "category": ["x", "x", "y", "x", "x", "y"],
            "age": [34, 34, 34, 61, 61, 61],
            "zip": ["1", "1", "1", "2", "2", "2"],
        }
    )


def test_daily_metrics_per_slice_match_hand_computed_values():
    day = day_frame()
    masks = slices(day, TRAINED_UNTIL, ["category", "age", "zip"], max_group_values=1)
    assert set(masks) == {
        "overall",
        "ranked_users",
        "cold_start",
        "ads_seen",
        "ads_unseen",
        "users_with_history",
        "users_without_history",
    }  # every group column has 2 values > max_group_values=1: no group slices
    assert "ads_seen" not in slices(day, None, [], 5)  # a version without its data window: no such slices
    masks = slices(day, TRAINED_UNTIL, ["category", "age"], max_group_values=5)
    assert masks["age=30-39"].tolist() == [True] * 3 + [False] * 3 and masks["category=y"].sum() == 2
    table = {row["slice"]: row for row in daily_metrics(day, masks, DAY, "3").iter_rows(named=True)}

    overall = table["overall"]
    assert (overall["impressions"], overall["clicks"], overall["model_version"]) == (6, 3, "3")
    assert overall["calibration_ratio"] == pytest.approx(2.7 / 3)  # sum pCTR / clicks
    labels, pctr = np.array([1, 0, 0, 1, 0, 1]), day["pctr"].to_numpy()
    loss = -np.mean(labels * np.log(pctr) + (1 - labels) * np.log(1 - pctr))
    assert overall["logloss"] == pytest.approx(loss)
    assert overall["normalized_entropy"] == pytest.approx(loss / math.log(2))  # CTR 0.5: entropy ln 2
    assert overall["auc"] == pytest.approx(8 / 9)  # 9 click/no-click pairs, one misordered: 0.4 < 0.5
    assert overall["gauc"] == pytest.approx((1.0 * 3 + 0.5 * 3) / 6)  # per user, weighted by impressions
    assert overall["top_n_coverage"] == pytest.approx(3 / 6)
    assert overall["ctr_in_top_n"] == pytest.approx(2 / 3) and overall["ctr_outside_top_n"] == pytest.approx(1 / 3)

    unseen = table["ads_unseen"]
    assert (unseen["impressions"], unseen["clicks"], unseen["top_n_coverage"]) == (2, 1, 0.0)
    assert math.isnan(unseen["ctr_in_top_n"]) and unseen["ctr_outside_top_n"] == 0.5
    assert (table["users_without_history"]["impressions"], table["users_without_history"]["auc"]) == (3, 1.0)
    assert (table["ranked_users"]["impressions"], table["ranked_users"]["gauc"]) == (3, 0.5)
    assert (table["cold_start"]["impressions"], table["cold_start"]["clicks"]) == (2, 1)


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, 5000)
    assert psi(reference, rng.normal(0, 1, 5000)) < 0.02
    assert psi(reference, rng.normal(1.5, 1, 5000)) > 0.25
    assert math.isnan(psi(reference, np.array([])))
    assert psi_categorical(["a", "b"] * 500, ["a", "b"] * 500) == pytest.approx(0.0)
    assert psi_categorical(["a", "b"] * 500, ["a"] * 900 + ["c"] * 100) > 0.25  # a new category counts


def test_input_drift_rows_and_unseen_share():
    day = day_frame().with_columns(ad_age_days=pl.lit(3.0), user_prior_clicks=pl.col("user_prior_impressions") // 2)
    reference = day.with_columns(ad_age_days=pl.lit(1.0))
    drift = input_drift(reference, day, TRAINED_UNTIL, DAY, "3")
    rows = {r["input"]: r for r in drift.iter_rows(named=True)}
    assert set(rows) == {
        "pctr",
        "user_prior_ctr",
        "user_prior_impressions",
        "ad_age_days",
        "category_mix",
        "unseen_ad_share",
    }
    assert rows["pctr"]["psi"] == pytest.approx(0.0) and rows["ad_age_days"]["psi"] > 1
    assert rows["unseen_ad_share"]["value"] == pytest.approx(2 / 6) and rows["unseen_ad_share"]["psi"] is None
    assert math.isnan(
        input_drift(reference, day, None, DAY, "3").filter(pl.col("input") == "unseen_ad_share")["value"][0]
    )


def overall_row(**values) -> pl.DataFrame:
    base = {"slice": "overall", "impressions": 5000, "calibration_ratio": 1.0, "normalized_entropy": 0.8, "auc": 0.7}
    return pl.DataFrame([base | values])


DRIFT = pl.DataFrame({"input": ["pctr", "unseen_ad_share"], "psi": [0.05, None], "value": [None, 0.1]})
OFFLINE = OfflineMetrics(auc=0.72, logloss=0.8 * binary_entropy(0.2), ctr=0.2)  # offline NE 0.8


@pytest.mark.parametrize(
    ("metrics", "drift", "expected"),
    [
        (overall_row(), DRIFT, []),  # healthy
        (overall_row(impressions=10, calibration_ratio=3.0), DRIFT, []),  # too few impressions to judge
        (overall_row(calibration_ratio=1.4), DRIFT, ["calibration ratio 1.400 outside [0.8, 1.25] on overall"]),
        (overall_row(normalized_entropy=0.86), DRIFT, ["normalized entropy 0.8600 > offline 0.8000 + 0.05"]),
        (overall_row(auc=0.6), DRIFT, ["AUC 0.6000 < offline 0.7200 - 0.05"]),
        (overall_row(), DRIFT.with_columns(psi=pl.Series([0.4, None])), ["PSI of pctr 0.400 > 0.25"]),
        # an input that grows with time by construction is reported, not alerted on
        (
            overall_row(),
            DRIFT.with_columns(input=pl.Series(["ad_age_days", "unseen_ad_share"]), psi=pl.Series([3.0, None])),
            [],
        ),
    ],
)
def test_breaches_follow_the_configured_thresholds(metrics, drift, expected):
    assert breaches(metrics, drift, OFFLINE, MonitorConfig()) == expected


def test_a_large_slice_out_of_calibration_is_a_breach_and_a_small_one_is_not():
    metrics = pl.concat(
        [
            overall_row(),
            pl.DataFrame(
                [
                    {
                        "slice": "category=x",
                        "impressions": 1200,
                        "calibration_ratio": 2.0,
                        "normalized_entropy": 0.9,
                        "auc": 0.7,
                    }
                ]
            ),
            pl.DataFrame(
                [
                    {
                        "slice": "age=90-99",
                        "impressions": 30,
                        "calibration_ratio": 4.0,
                        "normalized_entropy": 0.9,
                        "auc": 0.7,
                    }
                ]
            ),
        ]
    )
    assert breaches(metrics, DRIFT, OFFLINE, MonitorConfig()) == [
        "calibration ratio 2.000 outside [0.8, 1.25] on category=x"
    ]


def test_offline_metrics_come_from_the_retrain_runs_test_metrics():
    run = {
        "test.fine_tuned.overall.auc": 0.7,
        "test.fine_tuned.overall.logloss": 0.4,
        "test.fine_tuned.overall.clicks": 20.0,
        "test.fine_tuned.overall.pairs": 100.0,
    }
    offline = offline_metrics(run)
    assert offline == OfflineMetrics(0.7, 0.4, 0.2)
    assert offline.normalized_entropy == pytest.approx(0.4 / binary_entropy(0.2))
    with pytest.raises(ValueError, match="no test metric"):
        offline_metrics({"valid_logloss": 0.5})


def test_the_degraded_event_names_the_model_version_and_carries_the_metrics():
    metrics = daily_metrics(day_frame(), {"overall": np.ones(6, dtype=bool)}, DAY, "3")
    event = degraded_event("adrank-ctr", "3", DAY, ["AUC 0.6 < ..."], metrics)
    assert event["event"] == DEGRADED_EVENT
    assert event["resource"]["prefect.resource.id"] == "adrank.model.adrank-ctr.3"
    assert event["payload"]["run_date"] == "2026-05-12" and event["payload"]["breaches"] == ["AUC 0.6 < ..."]
    assert event["payload"]["metrics"]["impressions"] == 6


def test_impressions_of_hashed_users_are_matched_to_their_published_top_n(monkeypatch):
    from tasks.monitor import _in_top_n
    from tasks.user_keys import published_user_id

    monkeypatch.setenv("ADRANK_RANKING__USER_ID_SALT", "pepper")
    published = pl.DataFrame(
        {
            "user_id": [published_user_id("pepper", "u1"), hashlib.sha256(b"pepperu2").hexdigest()],  # HMAC, legacy
            "ad_id": ["a", "b"],
        }
    )
    day = pl.DataFrame({"user_id": ["u1", "u1", "u2", "u3"], "ad_id": ["a", "b", "b", "a"]})
    assert _in_top_n(load_settings(), day, published).to_list() == [True, False, True, False]
