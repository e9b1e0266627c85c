import math

import numpy as np
import polars as pl
import pytest

from tasks.evaluate import evaluation_table, popularity_ctr, to_markdown
from tasks.metrics import expected_calibration_error, logloss, mean_hit_rate_at_k, mean_ndcg_at_k, roc_auc


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


def test_popularity_shrinks_towards_the_global_ctr():
    train = pl.DataFrame({"ad_id": ["a", "a", "b", "b"], "is_clicked": [True, False, False, False]})
    test = pl.DataFrame({"ad_id": ["c", "a", "b"]})
    # global CTR 0.25 with 20 pseudo-impressions: a (1 + 5) / 22, b 5 / 22, unseen c 0.25
    assert popularity_ctr(train, test) == pytest.approx([0.25, 6 / 22, 5 / 22])


def test_evaluation_table_has_each_model_and_slice():
    test = pl.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u2"],
            "is_clicked": [True, False, True, False],
            "is_cold_start": [False, False, True, True],
        }
    )
    table = evaluation_table(test, {"good": np.array([0.9, 0.1, 0.8, 0.2]), "bad": np.array([0.1, 0.9, 0.2, 0.8])})
    assert table.select("model", "slice", "pairs").rows() == [
        ("good", "overall", 4),
        ("good", "cold_start", 2),
        ("bad", "overall", 4),
        ("bad", "cold_start", 2),
    ]
    assert table["auc"].to_list() == [1.0, 1.0, 0.0, 0.0]
    assert "| good" in to_markdown(table)
