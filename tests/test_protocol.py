"""The quality benchmark's protocol: a cold slice that is cold everywhere, equal information for peers,
paired intervals."""

import numpy as np
import polars as pl
import pytest

from benchmarks import baselines, protocol
from tasks.metrics import calibration_ratio, expected_calibration_error_equal_mass, group_auc
from tasks.pairs import build_pairs


def test_held_out_items_never_reach_training_or_validation(tmp_path, make_settings, sample_logs):
    full = build_pairs(make_settings())
    cold = protocol.hold_out_items(sample_logs, tmp_path / "held-out", seed=3, test_from=full.test_from)
    settings = make_settings(data={"logs": str(tmp_path / "held-out"), "history_length": 5})
    splits = protocol.time_split_pairs(settings, full.valid_from, full.test_from)
    ads = pl.read_parquet(sample_logs / "ads").with_columns(pl.col("ad_id").cast(pl.String))
    cold_titles = ads.filter(pl.col("ad_id").is_in(cold))["title"].to_list()
    assert cold and cold_titles

    for name in ("train", "valid"):
        seen = splits[name]
        assert not seen["ad_id"].is_in(cold).any()  # no pair
        assert not seen["history_ad_ids"].list.eval(pl.element().is_in(cold)).list.any().any()  # no history
        assert not any(title in text for text in seen["user_text"] for title in cold_titles)  # no text names one
    # the counts behind every prior were taken on the logs without them: a user's count is their pairs before
    impressions = pl.read_parquet(tmp_path / "held-out" / "impressions")
    assert not impressions.filter(pl.col("ts") < full.test_from)["ad_id"].cast(pl.String).is_in(cold).any()
    test = splits["test"]
    held_out = test.filter(pl.col("ad_id").is_in(cold))
    assert held_out.height > 0 and held_out["is_cold_start"].all()  # their test impressions are the cold slice
    assert (
        test.filter(pl.col("is_cold_start"))["ad_id"]
        .is_in(pl.concat([splits["train"], splits["valid"]])["ad_id"])
        .sum()
        == 0
    )
    # every seed is split at the full logs' cutoffs: the same test impressions
    assert test["shown_at"].min() >= full.test_from and splits["valid"]["shown_at"].max() < full.test_from


def test_content_features_carry_every_genre_the_year_and_the_history_genres():
    pairs = pl.DataFrame(
        {
            "user_id": ["u1", "u1"],
            "ad_id": ["m1", "m2"],
            "history_ad_ids": [[], ["m1", "m2"]],
            "user_prior_impressions": [0, 4],
            "user_prior_clicks": [0, 2],
        }
    )
    users = pl.DataFrame({"user_id": ["u1"], "age": [30]})
    ads = pl.DataFrame(
        {
            "ad_id": ["m1", "m2"],
            "category": ["Action", "Comedy"],
            "genres": [["Action", "Drama"], ["Comedy", "Drama"]],
            "year": [1995, 1971],
        }
    )
    features = baselines.content_features(pairs, users, ads)
    assert features[["genre_Action", "genre_Comedy", "genre_Drama"]].values.tolist() == [[1, 0, 1], [0, 1, 1]]
    assert features[["history_genre_Action", "history_genre_Drama"]].values.tolist() == [[0, 0], [1, 2]]
    assert features["year"].tolist() == [1995, 1971] and features["user_prior_ctr"].tolist()[1] == 0.5
    assert features["age"].tolist() == [30, 30]


def test_group_auc_equal_mass_ece_and_calibration_ratio_by_hand():
    users = np.array(["a", "a", "a", "b", "b", "c"])
    labels = np.array([1, 0, 0, 1, 0, 1])
    pctr = np.array([0.9, 0.2, 0.95, 0.1, 0.5, 0.3])
    # a: 1 of 2 negatives below the positive (0.5, 3 impressions); b: 0 (2 impressions); c: one class only
    assert group_auc(users, labels, pctr) == pytest.approx((0.5 * 3 + 0.0 * 2) / 5)
    assert calibration_ratio(labels, pctr) == pytest.approx(pctr.sum() / 3)
    # 2 equal-mass bins of 3 pairs: {0.1, 0.2, 0.3} vs clicks 2/3; {0.5, 0.9, 0.95} vs 1/3
    expected = 0.5 * abs(0.2 - 2 / 3) + 0.5 * abs(2.35 / 3 - 1 / 3)
    assert expected_calibration_error_equal_mass(labels, pctr, bins=2) == pytest.approx(expected)
    empty = np.array([], dtype=object)  # an empty slice (no cold-start ads in a test split) is not an error
    assert np.isnan(group_auc(empty, np.array([]), np.array([])))


def runs_of(predictions: dict[str, np.ndarray], test: pl.DataFrame) -> list[dict]:
    return [{"test": test, "predictions": predictions}]


def test_paired_bootstrap_is_zero_for_twins_and_above_zero_for_a_clearly_better_model():
    rng = np.random.default_rng(0)
    users = np.repeat([f"u{i:02d}" for i in range(40)], 25)
    labels = rng.random(len(users)) < 0.4
    test = pl.DataFrame({"user_id": users, "is_clicked": labels, "is_cold_start": rng.random(len(users)) < 0.3})
    good = np.clip(0.4 + 0.3 * (labels - 0.4) + rng.normal(0, 0.1, len(users)), 0.01, 0.99)
    noise = rng.uniform(0.2, 0.6, len(users))
    twins = protocol.paired_bootstrap(runs_of({"a": good, "b": good}, test), "a", "b", "overall", "auc", 50, 0)
    assert twins == (0.0, 0.0)
    for metric in ("auc", "gauc", "ndcg@10"):
        low, high = protocol.paired_bootstrap(
            runs_of({"a": good, "b": noise}, test), "a", "b", "cold_start", metric, 200, 0
        )
        assert 0 < low < high, metric
    low, high = protocol.paired_bootstrap(
        runs_of({"a": good, "b": noise}, test), "a", "b", "overall", "logloss", 200, 0
    )
    assert low < high < 0  # lower logloss: a negative difference


def test_best_peer_follows_each_metrics_direction():
    means = {
        "p": {"overall": {"auc": 0.7, "logloss": 0.60, "calibration_ratio": 1.10}},
        "q": {"overall": {"auc": 0.6, "logloss": 0.55, "calibration_ratio": 0.97}},
    }
    assert protocol.best_peer(means, ["p", "q"], "auc", "overall") == "p"
    assert protocol.best_peer(means, ["p", "q"], "logloss", "overall") == "q"
    assert protocol.best_peer(means, ["p", "q"], "calibration_ratio", "overall") == "q"
