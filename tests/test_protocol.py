"""The quality benchmark's protocol: a cold slice that is cold everywhere, equal information for peers,
paired intervals."""

from datetime import datetime

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from benchmarks import affinity_lever, baselines, protocol, sample_ceiling
from tasks.config import SampleDataConfig
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
    assert held_out.height > 0 and held_out["is_new_ad"].all()  # their test impressions are new to the model
    assert not test.filter(pl.col("is_new_ad"))["ad_id"].is_in(splits["train"]["ad_id"].implode()).any()
    # cold: the ad's first day; it has no count and no earlier pair at all, and every held-out ad starts so
    cold_pairs = test.filter(pl.col("is_cold_start"))
    assert cold_pairs.height > 0 and (cold_pairs["ad_prior_impressions"] == 0).all()
    first_day = test.group_by("ad_id").agg(pl.col("shown_at").dt.date().min().alias("first_day"))
    judged = test.join(first_day, on="ad_id").filter(pl.col("ad_id").is_in(cold))
    assert judged["is_cold_start"].to_list() == (judged["shown_at"].dt.date() == judged["first_day"]).to_list()
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
            "ad_prior_impressions": [10, 0],
            "ad_prior_clicks": [4, 0],
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


def known_models(seed: int = 0, kept: float = 0.3) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    """Test pairs whose labels are drawn from `truth`, a model that knows each pair's true click rate, and
    `blurred`, the same rates with a share 1 - kept replaced by noise: truth is better by construction, and the two are
    correlated, as two models of the same data are."""
    rng = np.random.default_rng(seed)
    users = np.repeat([f"u{i:03d}" for i in range(100)], 20)
    truth = rng.uniform(0.1, 0.7, len(users))
    labels = rng.random(len(users)) < truth
    slices = {name: rng.random(len(users)) < 0.5 for name in ("is_ranked_user", "is_cold_start", "is_new_ad")}
    test = pl.DataFrame(
        {"user_id": users, "shown_at": [datetime(2026, 5, 1)] * len(users), "is_clicked": labels}
        | {"user_prior_impressions": rng.integers(0, 3, len(users))}
        | slices
    )
    return test, truth, kept * truth + (1 - kept) * rng.uniform(0.1, 0.7, len(users))


def test_paired_bootstrap_is_zero_for_twins_and_above_zero_for_the_better_model():
    test, truth, blurred = known_models()
    twins = protocol.paired_bootstrap(runs_of({"a": truth, "b": truth}, test), "a", "b", "overall", "auc", 50, 0)
    assert (twins.mean, twins.low, twins.high) == (0.0, 0.0, 0.0)
    for slice_name in ("overall", "ranked_users", "cold_start"):
        for metric in ("auc", "gauc", "ndcg@10"):
            better = protocol.paired_bootstrap(
                runs_of({"a": truth, "b": blurred}, test), "a", "b", slice_name, metric, 200, 0
            )
            assert 0 < better.low < better.mean < better.high, (slice_name, metric)
    logloss = protocol.paired_bootstrap(
        runs_of({"a": truth, "b": blurred}, test), "a", "b", "overall", "logloss", 200, 0
    )
    assert logloss.low < logloss.high < 0  # lower logloss: a negative difference


def test_pairing_narrows_the_interval_of_two_correlated_models():
    """Drawing the same users for both models cancels what they share; drawing each model's users apart
    (unpaired) does not. A bootstrap that forgot the pairing would be as wide as the unpaired one."""
    test, truth, blurred = known_models(1, kept=0.9)  # nearly the same model
    paired = protocol.paired_bootstrap(runs_of({"a": truth, "b": blurred}, test), "a", "b", "overall", "auc", 300, 0)
    users = test["user_id"].to_numpy()
    labels = test["is_clicked"].to_numpy()
    members = [np.flatnonzero(users == u) for u in np.unique(users)]
    rng = np.random.default_rng(0)
    unpaired = []
    for _ in range(300):
        draw_a, draw_b = (
            np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))]) for _ in "ab"
        )
        unpaired.append(roc_auc_score(labels[draw_a], truth[draw_a]) - roc_auc_score(labels[draw_b], blurred[draw_b]))
    unpaired_width = np.subtract(*np.percentile(unpaired, [97.5, 2.5]))
    assert paired.high - paired.low < 0.7 * unpaired_width


def test_best_peer_follows_each_metrics_direction():
    means = {
        "p": {"overall": {"auc": 0.7, "logloss": 0.60, "calibration_ratio": 1.10}},
        "q": {"overall": {"auc": 0.6, "logloss": 0.55, "calibration_ratio": 0.97}},
    }
    assert protocol.best_peer(means, ["p", "q"], "auc", "overall") == "p"
    assert protocol.best_peer(means, ["p", "q"], "logloss", "overall") == "q"
    assert protocol.best_peer(means, ["p", "q"], "calibration_ratio", "overall") == "q"


def test_the_ceiling_reads_the_market_behind_a_runs_test_pairs_or_stops():
    """benchmarks/sample_ceiling.py: the click model's log-odds of the very impressions a run scored, or an error
    naming the first row that is not one of them."""
    clicks = sample_ceiling.click_frame(SampleDataConfig(users=30, advertisers=4, ads=10, days=6, cold_start_days=2))
    as_pairs = (pl.col("user_id"), pl.col("ts").alias("shown_at"), pl.col("clicked").alias("is_clicked"))
    test = clicks.tail(50).select(as_pairs)
    matched = sample_ceiling.aligned(test, clicks)
    assert matched["impression_id"].to_list() == clicks["impression_id"].tail(50).to_list()
    served = matched[sample_ceiling.SERVED_CEILING].to_numpy()
    shown = matched["click_model"].to_numpy()
    assert np.all(served >= shown)  # position 1: no penalty
    assert np.any(served > shown)

    flipped = test.with_columns(
        pl.when(pl.int_range(50) == 7).then(~pl.col("is_clicked")).otherwise(pl.col("is_clicked")).alias("is_clicked")
    )
    with pytest.raises(ValueError, match="test row 7"):
        sample_ceiling.aligned(flipped, clicks)
    with pytest.raises(ValueError, match=r"not the sample market's last 50 impressions: test row \d+"):
        sample_ceiling.aligned(clicks.head(50).select(as_pairs), clicks)  # other impressions
    with pytest.raises(ValueError, match="test pairs, the sample market"):
        sample_ceiling.aligned(pl.concat([test] * (clicks.height // 50 + 1)), clicks)  # more pairs than impressions


def test_the_affinity_lever_counts_only_what_the_day_start_knew():
    """benchmarks/affinity_lever.py: a pair's similar-ad counts hold its user's impressions before its day only,
    each weighted by the kernel row of the pair's ad; another user's never."""
    day = datetime(2026, 5, 3)
    shown = np.array(
        [day.replace(day=1), day.replace(day=2), day.replace(hour=1), day.replace(day=1)], "datetime64[us]"
    )
    # rows by user and time: u1 saw a (clicked), b, then a again on the pair's own day; u2 saw a (clicked)
    past = ({"u1": (0, 3), "u2": (3, 4)}, shown, np.array(["a", "b", "a", "a"]), np.array([1, 0, 1, 1]))
    kernel = np.array([[1.0, 0.5], [0.5, 1.0]])
    frame = pl.DataFrame({"user_id": ["u1", "u1"], "ad_id": ["a", "b"], "shown_at": [day.replace(hour=9)] * 2})
    counts = affinity_lever.similar_counts(frame, past, kernel, {"a": 0, "b": 1}, "day_start")
    assert counts.tolist() == [[2, 1, 1.5, 1.0], [2, 1, 1.5, 0.5]]  # shown, clicks, similar shown, similar clicks
    at_impression = affinity_lever.similar_counts(frame, past, kernel, {"a": 0, "b": 1}, "impression")
    assert at_impression[0].tolist() == [3, 2, 2.5, 2.0]  # the same day's earlier impression counts too
    at_its_moment = frame.with_columns(pl.lit(day.replace(hour=1)).alias("shown_at"))
    at_its_moment = affinity_lever.similar_counts(at_its_moment, past, kernel, {"a": 0, "b": 1}, "impression")
    assert at_its_moment[0].tolist() == [2, 1, 1.5, 1.0]  # strictly before: not the impression of that very moment
    terms = affinity_lever.affinity_terms(counts, base_rate=0.1)
    assert terms[0, 0] > terms[1, 0] > 0  # a's similar ads were clicked more than b's, both above the user's rate
