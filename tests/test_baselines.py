"""The ID baselines of benchmarks/quality.py learn from ids and side features."""

import numpy as np
import polars as pl

from benchmarks import baselines
from tasks.metrics import roc_auc


def toy(n: int, seed: int) -> tuple[pl.DataFrame, np.ndarray]:
    """Ad a1 is clicked by students far more often than ad a2; ad a3 is new (only in test)."""
    rng = np.random.default_rng(seed)
    pairs = pl.DataFrame(
        {"user_id": [f"u{i}" for i in rng.integers(0, 40, n)], "ad_id": rng.choice(["a1", "a2"], n).tolist()}
    )
    student = pairs["user_id"].str.extract(r"(\d+)").cast(pl.Int32) % 2 == 0
    p = np.where(pairs["ad_id"] == "a1", np.where(student, 0.8, 0.4), 0.1)
    return pairs, (rng.random(n) < p).astype(int)


def test_logistic_regression_and_lightgbm_rank_by_ids_and_profile():
    users = pl.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(40)],
            "occupation": ["student" if i % 2 == 0 else "nurse" for i in range(40)],
            "age": list(range(20, 60)),
        }
    )
    ads = pl.DataFrame({"ad_id": ["a1", "a2", "a3"], "category": ["games", "tax", "games"]})
    (train, y_train), (valid, y_valid), (test, y_test) = toy(3000, 1), toy(500, 2), toy(500, 3)
    features = [baselines.side_features(frame, users, ads) for frame in (train, valid, test)]
    logreg = baselines.logistic_regression(features[0], y_train, features[2], seed=0)
    trees = baselines.lightgbm(features[0], y_train, features[1], y_valid, features[2], seed=0)
    assert roc_auc(y_test, logreg) > 0.75 and roc_auc(y_test, trees) > 0.75
    assert features[0]["occupation"].tolist()[:1] in (["student"], ["nurse"])  # inputs left unchanged
    unseen = baselines.side_features(pl.DataFrame({"user_id": ["u0"], "ad_id": ["a3"]}), users, ads)
    assert 0 < baselines.logistic_regression(features[0], y_train, unseen, seed=0)[0] < 1


def test_prior_count_features_are_the_pairs_counts_and_a_missing_rate_without_impressions():
    pairs = pl.DataFrame(
        {
            "user_prior_impressions": [0, 4, 10],
            "user_prior_clicks": [0, 1, 10],
            "ad_prior_impressions": [8, 0, 2],
            "ad_prior_clicks": [2, 0, 1],
        }
    )
    features = baselines.with_prior_counts(pl.DataFrame({"user_id": ["u1", "u2", "u3"]}).to_pandas(), pairs)
    assert features["user_id"].tolist() == ["u1", "u2", "u3"]
    assert features["user_prior_impressions"].tolist() == [0, 4, 10]
    assert np.isnan(features["user_prior_ctr"][0]) and features["user_prior_ctr"].tolist()[1:] == [0.25, 1.0]
    assert features["ad_prior_ctr"][0] == 0.25 and np.isnan(features["ad_prior_ctr"][1])


def test_peers_get_the_users_past_impressions_of_the_ad_and_its_genres_where_adrank_reads_them():
    multi_hot = {"a": np.array([1, 0]), "b": np.array([1, 1]), "c": np.array([0, 1])}
    pairs = pl.DataFrame(
        {
            "ad_id": ["a", "c", "b"],
            "shown_ad_ids": [["a", "b", "c", "a"], ["a"], []],
            "shown_clicked": [[True, False, True, False], [True], []],
        }
    )
    features = baselines.shown_features(pairs, multi_hot)
    assert features["same_ad_shown"].tolist() == [2, 0, 0] and features["same_ad_clicked"].tolist() == [1, 0, 0]
    assert features["genre_shown"].tolist() == [3, 0, 0] and features["genre_clicked"].tolist() == [1, 0, 0]


def test_deepfm_learns_the_ids_and_profile_and_scores_unseen_values():
    users = pl.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(40)],
            "occupation": ["student" if i % 2 == 0 else "nurse" for i in range(40)],
        }
    )
    ads = pl.DataFrame({"ad_id": ["a1", "a2", "a3"], "category": ["games", "tax", "games"]})
    (train, y_train), (valid, y_valid), (test, y_test) = toy(3000, 1), toy(500, 2), toy(500, 3)
    features = [baselines.side_features(frame, users, ads) for frame in (train, valid, test)]
    scores = baselines.deepfm(features[0], y_train, features[1], y_valid, features[2], seed=0)
    assert scores.shape == (500,) and np.all((scores > 0) & (scores < 1))
    assert roc_auc(y_test, scores) > 0.75  # a1 for students over a1 for nurses over a2: ids and profile
    # a new ad (and a value never seen in training) gets the out-of-vocabulary embedding, not an error
    unseen = baselines.side_features(pl.DataFrame({"user_id": ["u0", "u1"], "ad_id": ["a3", "a1"]}), users, ads)
    new_ad, known = baselines.deepfm(features[0], y_train, features[1], y_valid, unseen, seed=0)
    assert 0 < new_ad < 1 and 0 < known < 1


def test_the_text_aware_peer_reads_the_texts_and_ranks_new_ads_by_them():
    """Clicks follow whether the ad's copy names the user's hobby; test ads are new (ids never trained on)."""
    hobbies = ["guitar", "tax", "garden", "chess"]

    def split(n: int, ad_words: list[str], seed: int) -> tuple[pl.DataFrame, np.ndarray]:
        r = np.random.default_rng(seed)
        user_hobby, ad_hobby = r.integers(0, 4, n), r.integers(0, 4, n)
        frame = pl.DataFrame(
            {
                "user_text": [f"recent searches: best {hobbies[h]} tips" for h in user_hobby],
                "ad_text": [f"{ad_words[r.integers(len(ad_words))]} for your {hobbies[h]}" for h in ad_hobby],
            }
        )
        return frame, (r.random(n) < np.where(user_hobby == ad_hobby, 0.8, 0.1)).astype(int)

    (train, y_train), (valid, y_valid) = split(3000, ["deals", "offers"], 1), split(500, ["deals", "offers"], 2)
    test, y_test = split(500, ["new kit", "fresh picks"], 3)
    texts = baselines.text_features({"train": train, "valid": valid, "test": test}, seed=0)
    assert {"tfidf_cosine", "user_svd_0", "ad_svd_0", "product_svd_0"} <= set(texts["test"].columns)
    trees = baselines.lightgbm(texts["train"], y_train, texts["valid"], y_valid, texts["test"], seed=0)
    assert roc_auc(y_test, trees) > 0.75
