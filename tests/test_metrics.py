import math
from datetime import datetime

import numpy as np
import polars as pl
import pytest

from tasks.evaluate import evaluation_table, popularity_ctr, to_markdown
from tasks.intervals import Interval, beyond_the_noise
from tasks.metrics import (
    expected_calibration_error,
    logloss,
    mean_hit_rate_at_k,
    mean_ndcg_at_k,
    ranking_lists,
    roc_auc,
)


def test_auc_by_hand():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered right
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert math.isnan(roc_auc(np.array([0, 0]), np.array([0.1, 0.2])))


def test_logloss_by_hand():
    assert logloss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)


@pytest.mark.parametrize(
    ("labels", "pctr", "expected"),
    [
        # one pair per bin: mean of |p - y| = (0.1 + 0.2 + 0.3 + 0.1) / 4
        ([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9], 0.175),
        # both in bin [0.1, 0.2): |0.15 - 0.5|
        ([0, 1], [0.12, 0.18], 0.35),
        # perfectly calibrated bins
        ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.0),
        # p = 1.0 falls in the last bin
        ([1], [1.0], 0.0),
    ],
)
def test_expected_calibration_error_by_hand(labels, pctr, expected):
    assert expected_calibration_error(np.array(labels), np.array(pctr)) == pytest.approx(expected)


def test_ndcg_at_10_by_hand():
    users = np.array(["a", "a", "a", "b", "b", "c"])
    labels = np.array([0, 1, 0, 0, 0, 1])
    pctr = np.array([0.9, 0.5, 0.1, 0.3, 0.2, 0.7])
    # only user a counts (b has no click, c one impression): the click is ranked 2nd -> 1 / log2(3)
    assert mean_ndcg_at_k(users, labels, pctr) == pytest.approx(1 / math.log2(3))
    assert mean_ndcg_at_k(users, labels, np.array([0.1, 0.9, 0.2, 0.3, 0.2, 0.7])) == pytest.approx(1.0)


def test_hit_rate_at_k_by_hand():
    users = np.array(["a", "a", "a", "b", "b", "c"])
    labels = np.array([0, 1, 0, 1, 0, 0])
    pctr = np.array([0.9, 0.5, 0.1, 0.1, 0.2, 0.7])
    # k=1: a's top is a miss, b's top is a miss; c has no click and does not count
    assert mean_hit_rate_at_k(users, labels, pctr, k=1) == 0.0
    assert mean_hit_rate_at_k(users, labels, pctr, k=2) == 1.0
    assert mean_hit_rate_at_k(users, labels, np.array([0.1, 0.9, 0.2, 0.1, 0.2, 0.7]), k=1) == 0.5


def test_popularity_is_each_ads_click_rate_before_the_day_shrunk_towards_the_training_ctr():
    train = pl.DataFrame({"is_clicked": [True, False, False, False]})  # its CTR: 0.25
    test = pl.DataFrame({"ad_prior_impressions": [0, 2, 2], "ad_prior_clicks": [0, 1, 0]})
    # 20 pseudo-impressions at 0.25: a cold ad 0.25, 1 click in 2 (1 + 5) / 22, none in 2 5 / 22
    assert popularity_ctr(train, test) == pytest.approx([0.25, 6 / 22, 5 / 22])


def test_evaluation_table_has_each_model_and_slice():
    test = pl.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u2"],
            "shown_at": [datetime(2026, 5, 1, 9)] * 4,
            "is_clicked": [True, False, True, False],
            "is_ranked_user": [True, True, False, False],
            "is_cold_start": [False, False, True, True],
            "is_new_ad": [False, True, True, True],
            "user_prior_impressions": [3, 3, 0, 0],
        }
    )
    table = evaluation_table(test, {"good": np.array([0.9, 0.1, 0.8, 0.2]), "bad": np.array([0.1, 0.9, 0.2, 0.8])})
    sizes = {"overall": 4, "ranked_users": 2, "cold_start": 2, "new_ads": 3, "users_without_history": 2}
    assert table.select("model", "slice", "pairs").rows() == [
        (m, s, n) for m in ("good", "bad") for s, n in sizes.items()
    ]
    assert table.filter(pl.col("slice") == "overall")["auc"].to_list() == [1.0, 0.0]
    assert table.filter(pl.col("slice") == "ranked_users")["gauc"].to_list() == [1.0, 0.0]
    # a user's impressions on two days were never ranked against each other: no list with both classes
    next_day = test.with_columns(shown_at=pl.Series([datetime(2026, 5, d, 9) for d in (1, 2, 1, 2)]))
    assert np.isnan(evaluation_table(next_day, {"good": np.array([0.9, 0.1, 0.8, 0.2])})["gauc"][0])
    assert "| good" in to_markdown(table)


def test_ranking_lists_are_a_users_day():
    lists = ranking_lists(
        np.array(["u1", "u1", "u2"]),
        pl.Series([datetime(2026, 5, 1, 23, 59), datetime(2026, 5, 2), datetime(2026, 5, 1)]),
    )
    assert lists.tolist() == ["u1 2026-05-01", "u1 2026-05-02", "u2 2026-05-01"]


def test_beyond_the_noise_reads_each_metric_in_its_own_direction():
    gains = {
        "logloss": Interval(-0.02, -0.03, -0.01),  # lower is better: better
        "auc": Interval(-0.02, -0.03, -0.01),  # higher is better: worse
        "gauc": Interval(0.01, -0.01, 0.03),  # straddles 0: neither
        "ece_equal_mass": Interval(math.nan, math.nan, math.nan),  # too few pairs: neither
    }
    assert beyond_the_noise(gains, better=True) == ["logloss"]
    assert beyond_the_noise(gains, better=False) == ["auc"]
