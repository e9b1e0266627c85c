"""The affinity term: a user's past response to ads like the one scored (tasks/affinity.py, the output layer)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from tasks.affinity import SHOWN_TEXT_COLUMN, kernel, similar_grid, with_similar
from tasks.output_layer import SIMILAR_COLUMNS, Calibration, PairPriors, fit_calibration, probability_log_odds
from tasks.semantic_match import load_match_encoder

ADS = pl.DataFrame(
    {
        "ad_id": ["shoes", "boots", "tax", "garden", "old"],
        "ad_text": [
            "Trail running shoes on sale",
            "Hiking boots for muddy trails",
            "File your quarterly tax forms",
            "Garden tools and seeds",
            "A retired ad, no longer shown",
        ],
    }
)
PAIRS = pl.DataFrame(
    {
        "ad_id": ["shoes", "tax", "garden", "boots"],
        "shown_ad_ids": [["boots", "shoes", "old"], ["boots"], [], ["tax", "tax"]],
        "shown_clicked": [[True, False, True], [True], [], [False, True]],
    }
).join(ADS, on="ad_id", how="left", maintain_order="left")


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return load_match_encoder(tiny_model_dir, torch.device("cpu"), 32, 4)


def test_similar_counts_weigh_each_past_impression_by_its_ads_likeness(encoder):
    out = with_similar(PAIRS, encoder, 0.2, ADS)
    vectors = dict(zip(ADS["ad_id"], encoder.embed(ADS["ad_text"].to_list()), strict=True))
    for row in out.iter_rows(named=True):  # by brute force
        weights = [float(kernel(vectors[row["ad_id"]] @ vectors[a], 0.2)) for a in row["shown_ad_ids"]]
        clicked = sum(w for w, c in zip(weights, row["shown_clicked"], strict=True) if c)
        assert row["similar_impressions"] == pytest.approx(sum(weights), rel=1e-5)
        assert row["similar_clicks"] == pytest.approx(clicked, rel=1e-5, abs=1e-12)
    # the same ad counts whole; no past impression counts nothing
    assert out["similar_impressions"][0] > 1.0 and out["similar_impressions"][2] == 0.0


def test_shown_ads_by_text_give_the_same_counts_as_by_id(encoder):
    by_id = with_similar(PAIRS, encoder, 0.1, ADS)
    texts = dict(ADS.iter_rows())
    by_text = PAIRS.drop("shown_ad_ids").with_columns(
        pl.Series(SHOWN_TEXT_COLUMN, [[texts[a] for a in ids] for ids in PAIRS["shown_ad_ids"]])
    )
    assert by_id.select(SIMILAR_COLUMNS).equals(with_similar(by_text, encoder, 0.1).select(SIMILAR_COLUMNS))


def test_rerank_counts_every_user_and_ad_as_the_pairs_are(encoder):
    vectors = encoder.embed(ADS["ad_text"].to_list())
    lengths = PAIRS["shown_ad_ids"].list.len().to_numpy()
    rows = {ad: i for i, ad in enumerate(ADS["ad_id"])}
    shown_rows = np.array([rows[a] for ids in PAIRS["shown_ad_ids"] for a in ids])
    clicked = np.concatenate([np.asarray(c, dtype=float) for c in PAIRS["shown_clicked"]])
    shown, clicks = similar_grid(lengths, shown_rows, clicked, vectors, vectors, 0.1)  # (users, every ad)
    for user, row in enumerate(with_similar(PAIRS, encoder, 0.1, ADS).iter_rows(named=True)):
        assert shown[user, rows[row["ad_id"]]] == pytest.approx(row["similar_impressions"], rel=1e-5)
        assert clicks[user, rows[row["ad_id"]]] == pytest.approx(row["similar_clicks"], rel=1e-5, abs=1e-12)


def test_a_shown_ad_without_a_text_or_flags_that_do_not_line_up_are_clear_errors(encoder):
    with pytest.raises(ValueError, match=r"no text: \['old'\]"):
        with_similar(PAIRS, encoder, 0.1, ADS.filter(pl.col("ad_id") != "old"))
    with pytest.raises(ValueError, match=r"one flag per shown ad: not so in rows \[0\]"):
        with_similar(
            PAIRS.with_columns(pl.Series("shown_clicked", [[True], [True], [], [False, True]])), encoder, 0.1, ADS
        )
    with pytest.raises(ValueError, match=r"shown_clicked hold nulls in rows \[3\]"):
        with_similar(
            PAIRS.with_columns(pl.Series("shown_clicked", [[True, False, True], [True], [], [None, True]])),
            encoder,
            0.1,
            ADS,
        )
    with pytest.raises(ValueError, match="past impressions"):
        with_similar(PAIRS, encoder, 0.1)  # ids without the ad texts


def test_the_terms_are_zero_for_a_user_never_shown_a_similar_ad_and_follow_their_clicks_on_those():
    layer = Calibration(global_log_odds=-2.0, user_prior_strength=20.0)
    frame = pl.DataFrame(
        {
            "user_prior_impressions": [0.0, 40.0, 40.0, 40.0],
            "user_prior_clicks": [0.0, 4.0, 4.0, 4.0],
            "similar_impressions": [0.0, 0.0, 10.0, 10.0],
            "similar_clicks": [0.0, 0.0, 8.0, 0.0],
        }
    )
    lift, exposure, product = layer.affinity_terms(PairPriors.of(frame)).T
    np.testing.assert_allclose(lift[:2], 0.0, atol=1e-9)
    np.testing.assert_allclose(exposure, np.log1p(frame["similar_impressions"].to_numpy()))
    assert lift[2] > 1.0 and lift[3] < -1.0 and product[2] == pytest.approx(lift[2] * exposure[2])
    with pytest.raises(ValueError, match="similar_impressions"):
        layer.affinity_terms(PairPriors.of(frame.drop(SIMILAR_COLUMNS)))


def test_the_layer_learns_the_affinity_weights_where_clicks_follow_the_users_response_to_similar_ads():
    rng = np.random.default_rng(0)
    n = 6000
    similar_shown = rng.integers(0, 30, n).astype(float)
    taste = rng.uniform(0.01, 0.6, n)  # each user's hidden liking of this kind of ad
    frame = pl.DataFrame(
        {
            "user_prior_impressions": np.full(n, 200.0),
            "user_prior_clicks": np.full(n, 20.0),
            "similar_impressions": similar_shown,
            "similar_clicks": rng.binomial(similar_shown.astype(int), taste).astype(float),
        }
    )
    labels = (rng.random(n) < taste).astype(int)
    template = Calibration(global_log_odds=float(probability_log_odds(0.1)), user_prior_strength=20.0)
    priors = PairPriors.of(frame)
    layer = fit_calibration(None, labels, priors, template, with_user_prior=True, with_affinity=True)
    assert layer.uses_affinity and layer.evidence_weight > 0
    without = fit_calibration(None, labels, priors, template, with_user_prior=True)
    loss = lambda p: -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))  # noqa: E731
    assert loss(layer.apply(np.zeros(n), priors)) < loss(without.apply(np.zeros(n), priors)) - 0.02
