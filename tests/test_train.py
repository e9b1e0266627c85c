"""Model behaviour: loss falls, scores follow the text, early stopping, the real pretrained model trains."""

import json
import math
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from tasks.config import packaged_model_path
from tasks.intervals import beyond_the_noise
from tasks.metrics import logloss, roc_auc
from tasks.model import MeanPooledClassifier, load_cross_encoder, predict_ctr, predict_logits
from tasks.output_layer import (
    Calibration,
    PairPriors,
    cold_fit_rows,
    fit_calibration,
    load_calibration,
    probability_log_odds,
    save_calibration,
)
from tasks.semantic_match import (
    MATCH_FOLDER,
    PASSED_OVER,
    MatchEncoder,
    MatchTuning,
    load_match_encoder,
    saved_match_encoder,
    tune_match_encoder,
    with_match,
)
from tasks.train import (
    SELECTION_FILE,
    ad_prior_offsets,
    calibrate,
    cold_ad_pairs,
    cold_reference,
    epoch_order,
    fine_tune,
    match_clicks,
    match_offsets,
    pairwise_loss,
    selection_sample,
    user_days,
)
from tests.conftest import build_settings

CLICK_AD, SKIP_AD = "Buy trail running shoes now", "Read the quarterly tax report"


WORDS = ["tax", "guitar", "garden", "chess", "tent", "bread", "shoes", "laptop"]  # searched, and sold by ads


def write_toy_pairs(path: Path, n: int, seed: int) -> Path:
    """Pairs whose label is decided by the ad text alone (with a few flipped labels); the ads' counts before
    each pair say the same for most pairs, a fifth are of cold ads (never shown before)."""
    rng = np.random.default_rng(seed)
    is_click_ad = rng.random(n) < 0.3
    users = [
        f"age: {a}, city: {c}. Recently clicked: nothing yet"
        for a, c in zip(rng.integers(18, 80, n), rng.choice(["Leeds", "York", "Bath"], n), strict=True)
    ]
    labels = is_click_ad ^ (rng.random(n) < 0.05)
    impressions = rng.integers(0, 50, n)
    ad_impressions = np.where(rng.random(n) < 0.2, 0, rng.integers(1, 200, n))
    pl.DataFrame(
        {
            "user_id": [f"u{u}" for u in rng.integers(0, 40, n)],
            "shown_at": [datetime(2026, 1, 1) + timedelta(minutes=i) for i in range(n)],
            "ad_id": np.where(is_click_ad, "click-ad", "skip-ad"),
            "user_text": users,
            "ad_text": np.where(is_click_ad, CLICK_AD, SKIP_AD),
            "is_clicked": labels,
            "user_prior_impressions": impressions,
            "user_prior_clicks": rng.binomial(impressions, 0.3),
            "ad_prior_impressions": ad_impressions,
            "ad_prior_clicks": rng.binomial(ad_impressions, np.where(is_click_ad, 0.95, 0.05)),
        }
    ).write_parquet(path)
    return path


@pytest.fixture
def toy_pairs(tmp_path):
    return write_toy_pairs(tmp_path / "train.parquet", 384, 1), write_toy_pairs(tmp_path / "valid.parquet", 128, 2)


def test_loss_falls_and_scores_follow_the_ad_text(tmp_path, make_settings, toy_pairs):
    settings = make_settings(
        training={"epochs": 3, "batch_size": 16, "learning_rate": 2e-3, "warmup_ratio": 0.0},
        # served = sigmoid(raw logit): the toy ad ids alone would explain the clicks, and Platt scaling would
        # already make a fresh head's chance separation of the two ad texts look good
        model={"calibration": "none"},
    )
    result = fine_tune(settings, *toy_pairs, tmp_path / "ckpt")

    losses = [row["valid_logloss"] for row in result.history]
    assert result.steps == 3 * 24
    assert min(losses[1:]) < losses[0] - 0.2, losses
    assert result.best_valid_logloss == min(losses)
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    assert not list((tmp_path / "ckpt").glob("*.bin"))

    model, tokenizer = load_cross_encoder(str(tmp_path / "ckpt"), torch.device("cpu"))
    pctr = predict_ctr(model, tokenizer, ["age: 40, city: Leeds"] * 2, [CLICK_AD, SKIP_AD], 64, 8)
    assert pctr[0] > 0.5 > pctr[1]


def test_early_stopping_keeps_the_best_checkpoint(tmp_path, make_settings, toy_pairs):
    # lr 0: step 2 (the fresh head, whose logit tells the two ad texts apart, which helps with cold ads) beats
    # the priors alone; step 4 is the same model, a miss, and patience 1 stops there
    settings = make_settings(
        training={"epochs": 5, "batch_size": 64, "learning_rate": 0.0, "patience": 1, "eval_every_steps": 2}
    )
    result = fine_tune(settings, *toy_pairs, tmp_path / "ckpt")
    assert result.stopped_early and result.steps == 4 and result.best_step == 2
    assert [row["step"] for row in result.history] == [0, 2, 4]
    assert result.history[1]["valid_logloss"] == result.best_valid_logloss < result.history[0]["valid_logloss"]


def test_steps_are_compared_on_a_sample_of_validation_and_the_output_layer_is_fitted_on_all_of_it(
    tmp_path, make_settings, toy_pairs
):
    valid = pl.read_parquet(toy_pairs[1]).with_row_index("row")
    sampled = make_settings(training={"selection_pairs": 16, "min_valid_clicks": 30}).training
    sample = selection_sample(valid, sampled)
    assert sample["is_clicked"].sum() == 30 and sample.height > 16  # pairs until min_valid_clicks clicks
    assert sample["row"].is_sorted() and sample.equals(selection_sample(valid, sampled))  # seeded, in order
    assert selection_sample(valid, make_settings().training).equals(valid)  # None: all of validation

    training = {"epochs": 2, "batch_size": 16, "learning_rate": 2e-3, "warmup_ratio": 0.0}
    training |= {"selection_pairs": 48, "min_valid_clicks": 10}
    settings = make_settings(training=training, model={"calibration": "platt"})
    result = fine_tune(settings, *toy_pairs, tmp_path / "ckpt")
    compared = selection_sample(valid, settings.training)
    assert 48 <= compared.height < valid.height and result.valid_clicks == compared["is_clicked"].sum()
    assert result.best_step > 0 and len(result.valid_logits) == valid.height
    model, tokenizer = load_cross_encoder(str(result.checkpoint), torch.device("cpu"))
    kept = predict_logits(model, tokenizer, valid["user_text"], valid["ad_text"], settings.model.max_seq_length, 64)
    np.testing.assert_allclose(result.valid_logits, kept, atol=1e-5)  # the kept weights', on all of validation
    train = pl.read_parquet(toy_pairs[0])
    on_all = calibrate(settings, train, valid, result.valid_logits)
    assert load_calibration(result.checkpoint).slope == pytest.approx(on_all.slope)
    on_sample = calibrate(settings, train, compared, kept[compared["row"].to_numpy()])
    assert on_sample.slope != pytest.approx(on_all.slope)


def test_zero_epochs_saves_the_fresh_head(tmp_path, make_settings, toy_pairs):
    result = fine_tune(make_settings(training={"epochs": 0}), *toy_pairs, tmp_path / "ckpt")
    assert result.steps == 0 and len(result.history) == 1
    assert (tmp_path / "ckpt" / "config.json").exists()


def test_user_prior_offset_is_added_to_the_logit_it_trains(tmp_path, make_settings):
    # labels follow each user's earlier click rate, which the offset carries and the texts do not
    rng = np.random.default_rng(5)
    frames = {}
    for name, n in (("train", 256), ("valid", 128)):
        rate = rng.choice([0.1, 0.9], n)
        frames[name] = pl.DataFrame(
            {
                "user_id": [f"u{i}" for i in range(n)],
                "shown_at": [datetime(2026, 1, 1)] * n,
                "ad_id": ["a"] * n,
                "user_text": ["a user"] * n,
                "ad_text": ["an ad"] * n,
                "is_clicked": rng.random(n) < rate,
                "user_prior_impressions": [200] * n,
                "user_prior_clicks": (200 * rate).astype(int),
                "ad_prior_impressions": [0] * n,
                "ad_prior_clicks": [0] * n,
            }
        )
        frames[name].write_parquet(tmp_path / f"{name}.parquet")
    paths = tmp_path / "train.parquet", tmp_path / "valid.parquet"
    fresh = {"epochs": 1, "learning_rate": 0.0}  # the fresh head only: the offset is the one difference
    without = fine_tune(make_settings(training=fresh), *paths, tmp_path / "a").history[-1]["valid_raw_logloss"]
    offset = {**fresh, "user_prior_offset": True}
    with_offset = fine_tune(make_settings(training=offset), *paths, tmp_path / "b").history[-1]["valid_raw_logloss"]
    assert with_offset < without - 0.2
    frames["train"].drop("user_prior_clicks", "user_prior_impressions").write_parquet(tmp_path / "train.parquet")
    with pytest.raises(ValueError, match="user_prior_offset = true needs the columns"):
        fine_tune(make_settings(training=offset), *paths, tmp_path / "c")


@pytest.mark.slow
def test_real_pretrained_minilm_fine_tunes(tmp_path, make_settings):
    """The packaged all-MiniLM-L6-v2 loads, trains a few steps and changes its weights."""
    train = write_toy_pairs(tmp_path / "train.parquet", 48, 3)
    valid = write_toy_pairs(tmp_path / "valid.parquet", 32, 4)
    settings = make_settings(
        model={"base_model": packaged_model_path(), "max_seq_length": 64, "calibration": "platt"},
        training={"epochs": 1, "batch_size": 16, "learning_rate": 2e-4, "warmup_ratio": 0.0},
    )
    result = fine_tune(settings, train, valid, tmp_path / "ckpt")
    assert result.steps == 3
    assert result.best_valid_logloss < result.history[0]["valid_logloss"]  # so the saved model is a trained one

    base, _ = load_cross_encoder(packaged_model_path(), torch.device("cpu"))
    tuned, tokenizer = load_cross_encoder(str(tmp_path / "ckpt"), torch.device("cpu"))
    assert tuned.config.hidden_size == 384 and tuned.config.num_hidden_layers == 6
    name = "encoder.layer.5.output.dense.weight"
    assert not torch.equal(parameter(base, name), parameter(tuned, name))
    pctr = predict_ctr(tuned, tokenizer, ["age: 40"], [CLICK_AD], 64, 1)
    assert 0.0 < pctr[0] < 1.0


def test_platt_scaling_recovers_a_known_calibration():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, 20000)
    labels = (rng.random(20000) < 1 / (1 + np.exp(-(0.5 * logits - 1.0)))).astype(int)
    calibration = fit_calibration(logits, labels)
    assert calibration.slope == pytest.approx(0.5, abs=0.05)
    assert calibration.intercept == pytest.approx(-1.0, abs=0.05)
    assert fit_calibration(logits, np.zeros(20000, dtype=int)) == Calibration()  # one class: identity


def test_the_ad_prior_is_the_ads_click_rate_before_the_request_shrunk_towards_the_global_rate():
    # global rate 0.5, 2 pseudo-impressions: 2 clicks in 3 -> (2 + 1) / (3 + 2); never shown -> the global rate
    layer = Calibration(global_log_odds=0.0, ad_prior_strength=2.0)
    priors = PairPriors(3, ad_counts=(np.array([2.0, 0.0, 0.0]), np.array([3.0, 1.0, 0.0])))
    assert layer.ad_prior(priors) == pytest.approx([np.log(0.6 / 0.4), np.log((1 / 3) / (2 / 3)), 0.0])
    assert layer.is_cold(priors).tolist() == [False, False, True]
    assert layer.is_cold(PairPriors(2)).all()  # no counts given: every ad is cold


def hit_or_flop_pairs(n: int, seed: int, cold_share: float) -> tuple:
    """Ads of two qualities (ad log-odds +-1, known from 10^7 earlier impressions unless the ad is cold),
    a text logit that reads the quality with noise, users of known click rates, labels drawn from
    0.5 * logit + 0.8 * ad quality + 0.7 * user log-odds."""
    rng = np.random.default_rng(seed)
    ad_term = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    logits = ad_term + rng.normal(0, 1, n)
    user_rate = rng.uniform(0.2, 0.8, n)
    big = 10.0**7  # long histories: shrinkage is negligible
    cold = rng.random(n) < cold_share
    ad_impressions = np.where(cold, 0.0, big)
    ad_clicks = np.where(cold, 0.0, np.round(big / (1 + np.exp(-ad_term))))
    priors = PairPriors(n, (np.round(user_rate * big), np.full(n, big)), (ad_clicks, ad_impressions))
    z = 0.5 * logits + 0.8 * ad_term + 0.7 * np.log(user_rate / (1 - user_rate))
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    return logits, labels, priors, cold


def test_prior_weights_are_fitted_and_cold_ads_get_weights_fitted_on_cold_pairs_without_the_ad_prior():
    logits, labels, priors, cold = hit_or_flop_pairs(60000, 2, cold_share=0.3)
    template = Calibration(global_log_odds=0.0, ad_prior_strength=5.0, user_prior_strength=20.0)
    calibration = fit_calibration(logits, labels, priors, template, with_ad_prior=True, with_user_prior=True)
    assert calibration.slope == pytest.approx(0.5, abs=0.06)
    assert calibration.ad_weight == pytest.approx(0.8, abs=0.08)
    assert calibration.user_weight == pytest.approx(0.7, abs=0.06)
    # cold ads have no ad prior, so the text's logit carries their quality: a steeper slope
    assert calibration.unseen_slope > calibration.slope + 0.2
    assert calibration.unseen_user_weight == pytest.approx(0.7, abs=0.1)
    assert calibration.cold_fit.startswith(f"{cold.sum()} validation pairs of cold ads")
    # a cold ad for a user with 3 clicks in 4 impressions: (3 + 20 * 0.5) / (4 + 20), the global rate 0.5
    user_rate = (3 + 20 * 0.5) / (4 + 20)
    z = calibration.unseen_slope * 0.3 + calibration.unseen_intercept
    z += calibration.unseen_user_weight * np.log(user_rate / (1 - user_rate))
    one = PairPriors(1, (np.array([3.0]), np.array([4.0])), (np.zeros(1), np.zeros(1)))
    assert calibration.apply(np.array([0.3]), one)[0] == pytest.approx(1 / (1 + np.exp(-z)))
    # no counts at all: a user with no impressions and a cold ad
    z0 = calibration.unseen_slope * 0.3 + calibration.unseen_intercept
    assert calibration.apply(np.array([0.3]))[0] == pytest.approx(1 / (1 + np.exp(-z0)))


def test_the_semantic_match_gets_its_weight_for_warm_and_for_cold_ads():
    # clicks drawn from 2 x match (a cosine) + the ad's quality (+-0.8), which its prior knows unless it is cold
    rng, n, big = np.random.default_rng(4), 60000, 10.0**7
    cold, quality = rng.random(n) < 0.3, np.where(rng.random(n) < 0.5, 0.8, -0.8)
    match = np.clip(rng.normal(0.3, 0.3, n), -1, 1)
    labels = (rng.random(n) < 1 / (1 + np.exp(-(2.0 * match + quality)))).astype(int)
    ad_counts = (np.where(cold, 0.0, np.round(big / (1 + np.exp(-quality)))), np.where(cold, 0.0, big))
    priors = PairPriors(n, ad_counts=ad_counts, match=match)
    template = Calibration(global_log_odds=0.0, ad_prior_strength=5.0, user_prior_strength=20.0)
    layer = fit_calibration(None, labels, priors, template, with_ad_prior=True, with_match=True)
    assert layer.slope == 0 and layer.match_weight == pytest.approx(2.0, abs=0.25)
    assert layer.unseen_match_weight == pytest.approx(2.0, abs=0.35)
    without = fit_calibration(None, labels, priors, template, with_ad_prior=True)
    assert without.match_weight == 0 and logloss(labels, layer.apply(np.zeros(len(labels)), priors)) < logloss(
        labels, without.apply(np.zeros(len(labels)), priors)
    )
    # explain's terms sum to the served log-odds, the match's included; the text term is centred on the mean
    # validation logit (a logit that barely spreads gets a large slope: slope x logit alone is a large number)
    logits = quality + np.random.default_rng(6).normal(0.0, 1.0, n)  # a text logit that reads the quality
    shifted = fit_calibration(logits + 50.0, labels, priors, template, with_ad_prior=True, with_match=True)
    assert shifted.reference_logit == pytest.approx(float(np.mean(logits)) + 50.0)
    warm = priors.take(np.array([int(np.flatnonzero(~cold)[0])]))
    centred = shifted.contributions(float(logits[~cold][0]) + 50.0, warm)
    assert abs(centred["text"]) < 10 and sum(centred.values()) == pytest.approx(
        shifted.log_odds(logits[~cold][:1] + 50.0, warm)[0]
    )
    one = priors.take(np.array([int(np.flatnonzero(cold)[0])]))
    terms = layer.contributions(0.0, one)
    assert terms["semantic_match"] == pytest.approx(layer.unseen_match_weight * one.match[0])
    assert sum(terms.values()) == pytest.approx(layer.log_odds(np.zeros(1), one)[0])
    with pytest.raises(ValueError, match="semantic_match"):  # a layer that weighs the match needs it
        layer.apply(np.zeros(1), replace(one, match=None))


def test_new_users_get_weights_of_their_own_and_the_warm_weights_are_fitted_on_users_with_a_history(tmp_path):
    # users with a history click by 0.2 x logit + 0.8 x ad quality + 0.7 x their log-odds; new users (no
    # impression before: no user prior) by 1.0 x logit + 0.8 x ad quality - 0.3: the text matters more to them
    rng, n, big = np.random.default_rng(3), 80000, 10.0**7  # long histories: shrinkage is negligible
    cold, new = rng.random(n) < 0.2, rng.random(n) < 0.6
    ad_term, user_rate = np.where(rng.random(n) < 0.5, 1.0, -1.0), rng.uniform(0.2, 0.8, n)
    logits = ad_term + rng.normal(0, 1, n)
    ad_counts = (np.where(cold, 0.0, np.round(big / (1 + np.exp(-ad_term)))), np.where(cold, 0.0, big))
    user_counts = (np.where(new, 0.0, np.round(user_rate * big)), np.where(new, 0.0, big))
    priors = PairPriors(n, user_counts, ad_counts)
    user_log_odds = np.log(user_rate / (1 - user_rate))
    z = np.where(new, 1.0 * logits + 0.8 * ad_term - 0.3, 0.2 * logits + 0.8 * ad_term + 0.7 * user_log_odds)
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    template = Calibration(global_log_odds=0.0, ad_prior_strength=5.0, user_prior_strength=20.0)
    fit = partial(fit_calibration, logits, labels, priors, template, with_ad_prior=True, with_user_prior=True)
    one_set, split = fit(), fit(with_new_user_weights=True)
    assert one_set.new_user_slope is None and 0.3 < one_set.slope < 0.9  # a slope for nobody
    warm_new = new & ~cold
    assert split.new_user_fit == f"{warm_new.sum()} validation pairs of new users ({labels[warm_new].sum()} clicks)"
    assert split.slope == pytest.approx(0.2, abs=0.05) and split.user_weight == pytest.approx(0.7, abs=0.08)
    assert split.new_user_slope == pytest.approx(1.0, abs=0.08)
    assert split.new_user_ad_weight == pytest.approx(0.8, abs=0.1)
    # each pair gets its set: cold ads the unseen weights (a new user's too), new users' warm ads theirs
    slope = split.weights(priors)["slope"]
    assert (slope[cold] == split.unseen_slope).all() and (slope[warm_new] == split.new_user_slope).all()
    assert (slope[~cold & ~new] == split.slope).all()
    known = ~new
    assert logloss(labels[known], split.apply(logits, priors)[known]) < logloss(
        labels[known], one_set.apply(logits, priors)[known]
    )
    # explain's terms sum to the served log-odds for a new user's warm ad
    pair = priors.take(np.array([int(np.flatnonzero(warm_new)[0])]))
    assert sum(split.contributions(0.7, pair).values()) == pytest.approx(split.log_odds(np.array([0.7]), pair)[0])
    # rerank's per-ad terms are those of users with a history, whom it ranks; saved and loaded as fitted
    no_users = PairPriors(1, ad_counts=pair.ad_counts)
    assert split.for_users_with_history().terms(no_users)[0][0] == split.slope
    assert split.terms(no_users)[0][0] == split.new_user_slope
    save_calibration(split, tmp_path)
    assert load_calibration(tmp_path) == split
    # too few new users' clicks: no set of their own, and a sentence saying so
    scarce = fit(with_new_user_weights=True, min_cold_clicks=int(labels[warm_new].sum()) + 1)
    assert scarce.new_user_slope is None and scarce.new_user_fit.startswith("none: new users' pairs hold")


def test_with_too_few_cold_clicks_the_cold_weights_come_from_every_pair():
    impressions = np.array([0, 0, 1, 1, 2, 5, 9, 9], dtype=float)
    labels = np.array([1, 0, 1, 1, 0, 1, 1, 0])
    priors = PairPriors(8, ad_counts=(np.zeros(8), impressions))
    rows, said = cold_fit_rows(priors, labels, min_clicks=1)
    assert rows.tolist() == [True, True] + [False] * 6 and said == "2 validation pairs of cold ads (1 clicks)"
    rows, said = cold_fit_rows(priors, labels, min_clicks=2)  # 1 cold click: every pair, as if no ad were known
    assert (
        rows.all()
        and said == "all 8 validation pairs without the ad prior (2 of cold ads hold 1 clicks, at least 2 wanted)"
    )
    clicked = np.array([1, 1, 0, 1, 0, 1, 1, 0])  # both cold pairs clicked: nothing to fit on them alone
    rows, said = cold_fit_rows(priors, clicked, min_clicks=2)
    assert rows.all() and said.endswith("(2 of cold ads hold 2 clicks, every one clicked: one class only)")


def test_with_too_few_cold_clicks_the_training_splits_cold_ads_choose_where_their_weights_are_fitted():
    # validation: 1 cold click; ads shown once or twice before click half the time, ads shown often a tenth
    rng = np.random.default_rng(0)
    impressions = np.repeat([0.0, 1.0, 2.0, 50.0], [10, 300, 300, 3000])
    labels = (rng.random(len(impressions)) < np.where(impressions < 10, 0.5, 0.1)).astype(int)
    labels[:10] = [1] + [0] * 9
    priors = PairPriors(len(labels), ad_counts=(np.zeros(len(labels)), impressions))
    shown = lambda rate: (rng.random(2000) < rate).astype(int)  # noqa: E731 the training split's cold ads
    rows, said = cold_fit_rows(priors, labels, 100, reference=(None, shown(0.5)))  # as new as the least-shown
    assert rows.tolist() == (impressions <= 1).tolist()  # shown once: already 100 clicks and more
    assert said.startswith("310 validation pairs of the least-shown ads (shown at most 1 times before;")
    assert "the training split's 2000 pairs of cold ads" in said
    rows, said = cold_fit_rows(priors, labels, 100, reference=(None, shown(0.17)))  # at every pair's rate
    assert rows.all() and said.startswith("all 3610 validation pairs without the ad prior (10 of cold ads hold 1")
    assert "; the least-shown ads' 310 pairs instead: " in said
    # too few of the training split's cold clicks to choose by, or none given: every pair, as before
    assert cold_fit_rows(priors, labels, 100, reference=(None, shown(0.02)))[0].all()
    assert cold_fit_rows(priors, labels, 100)[0].all()
    # the same choice inside the layer: its cold intercept is the least-shown ads' rate, not every pair's
    template = Calibration(global_log_odds=float(probability_log_odds(labels.mean())))
    cold_reference = (PairPriors(2000, ad_counts=(np.zeros(2000), np.zeros(2000))), shown(0.5))
    layer = fit_calibration(None, labels, priors, template, with_ad_prior=True, cold_reference=cold_reference)
    cold_pair = PairPriors(1, ad_counts=(np.zeros(1), np.zeros(1)))
    assert layer.apply(np.zeros(1), cold_pair)[0] == pytest.approx(labels[impressions <= 1].mean(), abs=0.02)
    assert "least-shown" in layer.cold_fit
    # with the user prior (as retrain fits it): the same choice, the user term fitted and scored alike
    users = (rng.integers(0, 3, len(labels)).astype(float), np.full(len(labels), 10.0))
    with_users = PairPriors(len(labels), users, priors.ad_counts)
    reference_users = (rng.integers(0, 3, 2000).astype(float), np.full(2000, 10.0))
    cold_reference = (replace(cold_reference[0], user_counts=reference_users), cold_reference[1])
    layer = fit_calibration(
        None, labels, with_users, template, with_ad_prior=True, with_user_prior=True, cold_reference=cold_reference
    )
    assert "least-shown" in layer.cold_fit and layer.unseen_user_weight is not None


def test_the_training_splits_cold_ads_leave_out_its_first_day_where_every_ad_is_cold():
    day = lambda d, h=9: datetime(2026, 10, d, h)  # noqa: E731
    train = pl.DataFrame(
        {
            "shown_at": [day(1), day(1, 23), day(2), day(2), day(3)],
            "ad_prior_impressions": [0, 0, 0, 4, None],
            "ad_prior_clicks": [0, 0, 0, 1, None],
            "user_prior_impressions": [0, 1, 2, 3, 4],
            "user_prior_clicks": [0, 0, 1, 1, 1],
            "is_clicked": [True, False, True, False, False],
        }
    )
    assert cold_ad_pairs(train)["shown_at"].to_list() == [day(2), day(3)]  # a null count: never shown before
    priors, labels = cold_reference(train)
    assert labels.tolist() == [1, 0] and priors.user_counts[1].tolist() == [2.0, 4.0]
    assert cold_ad_pairs(train.drop("ad_prior_impressions")) is None  # no ad counts: no reference


def test_without_logits_the_layer_is_the_priors_alone():
    logits, labels, priors, _ = hit_or_flop_pairs(20000, 3, cold_share=0.3)
    template = Calibration(global_log_odds=0.0, ad_prior_strength=5.0, user_prior_strength=20.0)
    priors_only = fit_calibration(None, labels, priors, template, with_ad_prior=True, with_user_prior=True)
    assert priors_only.slope == priors_only.unseen_slope == 0
    assert priors_only.ad_weight > 0.5 and priors_only.user_weight > 0.5
    np.testing.assert_allclose(priors_only.apply(logits, priors), priors_only.apply(np.zeros(20000), priors))
    assert fit_calibration(None, labels).slope == 0  # Platt without a logit: the click rate alone


def test_a_calibration_saved_before_point_in_time_ad_counts_scores_as_it_did(tmp_path):
    old = {"slope": 2.0, "intercept": -1.0, "ad_weight": 0.5, "default_ad_log_odds": 0.2, "ad_log_odds": {"a": 1.0}}
    (tmp_path / "calibration.json").write_text(json.dumps(old))
    calibration = load_calibration(tmp_path)
    counts = (np.array([9, 9]), np.array([10, 10]))
    got = calibration.apply(np.array([0.1, 0.1]), PairPriors(2, counts, counts, ["a", "new"]))
    z = 2.0 * 0.1 - 1.0 + 0.5 * np.array([1.0, 0.2])
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-z)))
    assert calibration.is_cold(PairPriors(2, ad_ids=["a", None])).tolist() == [False, True]


def test_fine_tuning_saves_a_calibration_that_is_used_when_loading(tmp_path, make_settings, toy_pairs):
    tuned = fine_tune(make_settings(training={"epochs": 1}), *toy_pairs, tmp_path / "a")
    hybrid = load_calibration(tuned.checkpoint)  # default: text + semantic match + ad prior + user prior
    assert hybrid.ad_weight > 0 and not hybrid.ad_log_odds and "validation pairs" in hybrid.cold_fit
    assert hybrid.match_weight != 0 and (tuned.checkpoint / MATCH_FOLDER / "model.safetensors").exists()
    warm = PairPriors(2, ad_counts=(np.array([95.0, 5.0]), np.array([100.0, 100.0])), match=np.zeros(2))
    click_ad, skip_ad = hybrid.log_odds(np.zeros(2), warm)
    assert click_ad > skip_ad  # the ads' earlier click rates
    selection = json.loads((tuned.checkpoint / SELECTION_FILE).read_text())
    assert selection["kept_step"] == tuned.best_step and set(selection["text_gain"]) == {"logloss", "auc", "gauc"}

    settings = make_settings(training={"epochs": 1}, model={"calibration": "platt"})
    platt = load_calibration(fine_tune(settings, *toy_pairs, tmp_path / "b").checkpoint)
    assert platt.ad_weight == platt.match_weight == 0 and not platt.ad_log_odds
    assert not (tmp_path / "b" / MATCH_FOLDER).exists()  # no match term: no encoder saved for it
    assert load_calibration(tmp_path) == Calibration()  # no file: identity


def test_a_run_where_no_step_beats_the_priors_serves_them_without_text(
    tmp_path, make_settings, toy_pairs, constant_model_dir
):
    # a text model that says nothing (the same logit for every pair, lr 0): no trained step beats the priors
    settings = make_settings(
        model={"base_model": str(constant_model_dir)},
        training={"epochs": 2, "learning_rate": 0.0, "eval_every_steps": 4, "patience": 9},
    )
    result = fine_tune(settings, *toy_pairs, tmp_path / "ckpt")
    assert result.best_step == 0 and result.best_trained_step is not None and result.best_trained_step > 0
    layer = load_calibration(result.checkpoint)
    assert layer.slope == 0 and layer.unseen_slope == 0
    assert result.text_gain["auc"].mean == 0  # the best trained step scores validation as the priors do
    valid = with_match(
        pl.read_parquet(toy_pairs[1]), saved_match_encoder(result.checkpoint, torch.device("cpu"), 64, 8)
    )
    np.testing.assert_allclose(result.valid_pctr, layer.apply(np.zeros(valid.height), PairPriors.of(valid)))


def parameter(model: torch.nn.Module, suffix: str) -> torch.Tensor:
    """The one parameter whose name ends with suffix (names differ by pooling: bert.* or encoder.*)."""
    (found,) = [p for n, p in model.named_parameters() if n.endswith(suffix)]
    return found


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize(("trainable_layers", "changed_layers"), [(0, set()), (1, {1}), (None, {0, 1})])
def test_trainable_layers_freezes_the_rest(
    tmp_path, make_settings, toy_pairs, tiny_model_dir, trainable_layers, changed_layers, pooling
):
    settings = make_settings(
        training={"epochs": 1, "trainable_layers": trainable_layers, "learning_rate": 1e-2},
        # served = sigmoid(raw logit): the fresh head's base rate is off, so every trained step beats step 0
        model={"calibration": "none", "pooling": pooling},
    )
    result = fine_tune(settings, *toy_pairs, tmp_path / "ckpt")
    assert result.best_valid_logloss < result.history[0]["valid_logloss"] and result.best_step > 0
    base = load_cross_encoder(str(tiny_model_dir), torch.device("cpu"))[0]
    tuned = load_cross_encoder(str(result.checkpoint), torch.device("cpu"))[0]
    assert isinstance(tuned, MeanPooledClassifier) == (pooling == "mean")  # loaded the way it was trained
    changed = {
        layer
        for layer in (0, 1)
        if not torch.equal(
            parameter(base, f"encoder.layer.{layer}.output.dense.weight"),
            parameter(tuned, f"encoder.layer.{layer}.output.dense.weight"),
        )
    }
    assert changed == changed_layers
    embeddings = "embeddings.word_embeddings.weight"
    assert torch.equal(parameter(base, embeddings), parameter(tuned, embeddings)) == (trainable_layers is not None)
    assert not torch.equal(parameter(base, "classifier.weight"), parameter(tuned, "classifier.weight"))


TRAIN_WORKER = """
import json, sys
from pathlib import Path
from tasks.config import load_settings
from tasks.train import fine_tune
fine_tune(load_settings(json.loads(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
"""


def resumable_steps(settings) -> int:
    """Steps of the saved resume state (0: none yet); folders being swapped in are skipped."""
    for path in settings.checkpoints_dir.glob("resume/*/state.json"):
        if path.parent.suffix not in (".tmp", ".old"):
            try:
                return json.loads(path.read_text())["steps"]
            except FileNotFoundError:  # the writer swapped the folder between the glob and the read
                return 0
    return 0


@pytest.mark.fault
def test_a_killed_fine_tune_resumes_from_its_last_checkpoint_and_ends_the_same(
    tmp_path, make_settings, toy_pairs, tiny_model_dir, sample_logs, capsys
):
    training = {"epochs": 12, "batch_size": 16, "learning_rate": 1e-3, "patience": 100, "checkpoint_every_steps": 10}
    uninterrupted = fine_tune(make_settings(training=training), *toy_pairs, tmp_path / "a")

    settings = build_settings(tmp_path / "home-b", tiny_model_dir, sample_logs, training=training)
    args = [json.dumps(settings.model_dump(mode="json")), *map(str, toy_pairs), str(tmp_path / "b-killed")]
    process = subprocess.Popen([sys.executable, "-c", TRAIN_WORKER, *args], cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 120
    while resumable_steps(settings) < 100:
        assert process.poll() is None, "training finished before the kill"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    capsys.readouterr()
    resumed = fine_tune(settings, *toy_pairs, tmp_path / "b")
    resumed_from = int(re.search(r"resuming from step (\d+)", capsys.readouterr().out).group(1))
    assert 100 <= resumed_from < resumed.steps  # it went on from the kill, it did not start over
    assert len(resumed.history) == len(uninterrupted.history) == 13  # step 0 and one validation per epoch
    for got, want in zip(resumed.history, uninterrupted.history, strict=True):
        assert got == pytest.approx(want, rel=1e-4, nan_ok=True)
    assert resumed.best_valid_logloss == pytest.approx(uninterrupted.best_valid_logloss, rel=1e-5)
    assert load_calibration(resumed.checkpoint).slope == pytest.approx(
        load_calibration(uninterrupted.checkpoint).slope, rel=1e-3
    )
    assert not list(settings.checkpoints_dir.glob("resume/*"))  # finished: the resume state is gone


@pytest.mark.fault
def test_a_pickled_checkpoint_is_refused(tmp_path, tiny_model_dir):
    pickled = tmp_path / "pickled"
    model, tokenizer = load_cross_encoder(str(tiny_model_dir), torch.device("cpu"))
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # the legacy format: a pickle
    tokenizer.save_pretrained(pickled)
    assert (pickled / "pytorch_model.bin").exists() and not list(pickled.glob("*.safetensors"))
    with pytest.raises(OSError, match="safetensors"):
        load_cross_encoder(str(pickled), torch.device("cpu"))


def test_pairwise_loss_counts_only_clicked_over_unclicked_pairs_of_the_same_user_day():
    logits, labels = torch.tensor([2.0, 0.0, 1.0, -1.0]), torch.tensor([1.0, 0.0, 0.0, 1.0])
    # group 0: (pair 0 over pair 1); group 1: pair 3 clicked over pair 2 -> margin -2
    loss = pairwise_loss(logits, labels, torch.tensor([0, 0, 1, 1]))
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(2.0))) / 2
    assert loss.item() == pytest.approx(expected)
    assert pairwise_loss(logits, labels, torch.tensor([0, 1, 2, 3])).item() == 0.0  # no pair shares a group


def test_ranking_batches_keep_each_user_day_together():
    pairs = pl.DataFrame(
        {
            "user_id": ["a", "b", "a", "a", "b", "c"],
            "shown_at": [datetime(2026, 1, 1, h) for h in (1, 2, 3)] + [datetime(2026, 1, 2, 1)] * 3,
        }
    )
    groups = user_days(pairs)
    assert groups[0] == groups[2] != groups[3] and len(set(groups.tolist())) == 5  # a on day 1 is one list
    order = epoch_order(len(pairs), torch.tensor(groups), torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(6))
    ids = groups[order]
    assert all(ids[i] == ids[i + 1] or ids[i] not in ids[i + 1 :] for i in range(5))  # contiguous groups
    settings_error = "ranking_loss_weight > 0 needs the columns user_id and shown_at"
    with pytest.raises(ValueError, match=settings_error):
        user_days(pairs.drop("shown_at"))


def test_ad_prior_offset_is_the_ads_point_in_time_log_odds_and_dropped_for_a_share(make_settings):
    train = pl.DataFrame({"is_clicked": [True, False, True, False]})  # its click rate: 0.5
    pairs = pl.DataFrame({"ad_prior_impressions": [3, 1, 0], "ad_prior_clicks": [2, 0, 0]})
    settings = make_settings(
        model={"ad_prior_strength": 2.0}, training={"ad_prior_offset": True, "ad_prior_offset_dropout": 0.0}
    )
    log_odds = lambda p: math.log(p / (1 - p))  # noqa: E731
    # (2 + 2 * 0.5) / (3 + 2); (0 + 1) / (1 + 2); a cold ad: the global rate, offset 0
    expected = [log_odds(3 / 5), log_odds(1 / 3), 0.0]
    assert ad_prior_offsets(settings, train, pairs, in_train=True).tolist() == pytest.approx(expected)
    dropped = make_settings(training={"ad_prior_offset": True, "ad_prior_offset_dropout": 1.0})
    assert not ad_prior_offsets(dropped, train, pairs, in_train=True).any()
    assert ad_prior_offsets(dropped, train, pairs).tolist() == pytest.approx(
        [log_odds(p) for p in ((2 + 2.5) / (3 + 5), (0 + 2.5) / (1 + 5), 0.5)]
    )  # validation pairs keep theirs (default strength 5)
    assert not ad_prior_offsets(make_settings(), train, pairs, in_train=True).any()  # off by default
    with pytest.raises(ValueError, match="ad_prior_offset = true needs the columns"):
        ad_prior_offsets(settings, train, pairs.drop("ad_prior_clicks"))


@pytest.mark.fault
def test_a_resume_state_saves_over_what_a_kill_during_the_last_swap_left(tmp_path, tiny_model_dir):
    from transformers import get_linear_schedule_with_warmup

    from tasks.train import save_resume_state

    model, _ = load_cross_encoder(str(tiny_model_dir), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = get_linear_schedule_with_warmup(optimizer, 0, 10)
    state = {"epoch_generator": torch.Generator().get_state(), "best_valid_logits": np.zeros(3, np.float32)}
    folder = tmp_path / "resume" / "run"
    save_resume_state(folder, model, optimizer, schedule, state | {"step": 5})
    stale = folder.with_name("run.old")  # killed inside the previous save's clean-up: half deleted
    stale.mkdir()
    (stale / "trainer.pt").write_bytes(b"partial")
    save_resume_state(folder, model, optimizer, schedule, state | {"step": 6})
    assert json.loads((folder / "state.json").read_text())["step"] == 6 and not stale.exists()


def test_the_match_offset_is_the_match_times_its_weight_on_the_training_pairs(tmp_path, tiny_model_dir):
    encoder = load_match_encoder(tiny_model_dir, torch.device("cpu"), 32, 8)
    rng = np.random.default_rng(0)
    pairs = pl.DataFrame(
        {
            "user_text": [f"searches {w} {v}" for w, v in rng.choice(WORDS, (4000, 2))],
            "ad_text": [f"ad for {w}" for w in rng.choice(WORDS, 4000)],
        }
    )
    match = encoder.match(pairs["user_text"].to_list(), pairs["ad_text"].to_list())
    z = 8.0 * (match - match.mean()) / match.std()
    pairs = pairs.with_columns(is_clicked=pl.Series(rng.random(4000) < 1 / (1 + np.exp(-z))))
    offsets, weight = match_offsets(encoder, pairs)
    assert weight > 0 and np.allclose(offsets, weight * match)
    with pytest.raises(ValueError, match="match_offset"):  # an offset the served layer would drop
        build_settings(
            Path("/tmp"), tiny_model_dir, None, training={"match_offset": True}, model={"calibration": "platt"}
        )


def test_tuning_the_match_on_clicks_teaches_the_encoder_which_ad_each_user_picks(tiny_model_dir):
    """Users who search a word click the ad for that word: the random tiny encoder barely knows it, tuned with
    in-batch negatives it ranks each user's ad first on held-out users; it is frozen afterwards."""
    rng = np.random.default_rng(0)

    def clicks(n: int) -> pl.DataFrame:
        picked = rng.choice(WORDS, n)
        return pl.DataFrame(
            {
                "user_id": [f"u{i}" for i in rng.integers(0, 10**6, n)],
                "ad_id": picked,
                "user_text": [f"age {a}, searches {w}" for a, w in zip(rng.integers(18, 80, n), picked, strict=True)],
                "ad_text": [f"ad for {w}" for w in picked],
            }
        )

    def held_out_auc(encoder: MatchEncoder) -> float:
        users = clicks(200)  # each user against every word's ad: its own word is the click
        scores = encoder.embed(users["user_text"].to_list()) @ encoder.embed([f"ad for {w}" for w in WORDS]).T
        labels = users["ad_id"].to_numpy()[:, None] == np.array(WORDS)[None, :]
        return roc_auc(labels.ravel().astype(int), scores.ravel())

    encoder = load_match_encoder(tiny_model_dir, torch.device("cpu"), 32, 64)
    before = held_out_auc(encoder)
    tuning = MatchTuning(epochs=4, batch_size=16, learning_rate=1e-3, scale=20.0, warmup_ratio=0.0, seed=0)
    losses = tune_match_encoder(encoder, clicks(480), tuning)
    assert len(losses) == 4 * 30 and np.mean(losses[-10:]) < np.mean(losses[:10])
    assert held_out_auc(encoder) > max(before + 0.1, 0.95)  # 0.79 before, 1.0 after
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())

    # one user's clicks: another click of the same user is no negative, so there is nothing to learn
    one_user = clicks(32).with_columns(user_id=pl.lit("u0"))
    assert tune_match_encoder(encoder, one_user, replace(tuning, epochs=1)) == [0.0, 0.0]


def test_the_match_tunes_on_each_click_with_ads_its_user_passed_over_that_day():
    day = datetime(2026, 1, 1)
    pairs = pl.DataFrame(
        {
            "user_id": ["u0"] * 6 + ["u1"] * 2,
            "shown_at": [day] * 4 + [day + timedelta(days=1)] * 2 + [day] * 2,
            "ad_id": ["a", "b", "c", "d", "e", "f", "g", "h"],
            "ad_text": [f"{ad} ad" for ad in "abcdefgh"],
            "is_clicked": [True, False, False, False, True, True, True, True],
        }
    )
    clicks = match_clicks(pairs, 2, seed=0)
    assert clicks["ad_id"].to_list() == ["a", "e", "f", "g", "h"]  # the clicks, in order
    passed = [[ad["ad_id"] for ad in ads or []] for ads in clicks[PASSED_OVER].to_list()]
    assert len(passed[0]) == 2 and set(passed[0]) <= {"b", "c", "d"}  # u0's first day: two of its three
    assert passed[1:] == [[], [], [], []]  # u0's second day and u1 passed over nothing
    assert match_clicks(pairs, 2, seed=0).equals(clicks)  # a seeded draw
    assert PASSED_OVER not in match_clicks(pairs, 0, seed=0).columns
    with pytest.raises(ValueError, match="match_passed_over > 0 needs the columns user_id and shown_at"):
        match_clicks(pairs.drop("shown_at"), 2, seed=0)


def write_word_pairs(path: Path, users: int, seed: int, follows_text: bool) -> Path:
    """Each user searches one of WORDS and is shown four ads, one per word; following the text they click the ad of
    their word (and now and then another), without it a random one."""
    rng = np.random.default_rng(seed)
    searched = rng.choice(WORDS, users)
    rows = []
    for user, word in enumerate(searched):
        for ad in [word, *rng.choice([w for w in WORDS if w != word], 3, replace=False)]:
            clicked = (ad == word) == (rng.random() < 0.9) if follows_text else rng.random() < 0.25
            text = f"age {rng.integers(18, 80)}, searches {word}"
            rows.append((f"u{seed}-{user}", datetime(2026, 1, 1), ad, text, f"ad for {ad}", clicked))
    columns = ["user_id", "shown_at", "ad_id", "user_text", "ad_text", "is_clicked"]
    pl.DataFrame(rows, schema=columns, orient="row").write_parquet(path)
    return path


def test_the_tuned_match_is_served_only_if_it_beats_the_zero_shot_one_beyond_the_noise(tmp_path, make_settings):
    """The match's guard: clicks that follow the text teach the encoder a match that wins validation beyond the
    noise (kept); random clicks teach it noise (the zero-shot encoder is served), unless the guard is off."""
    base = next(load_match_encoder(make_settings().model.base_model, torch.device("cpu"), 32, 8).model.parameters())
    tuning = {"epochs": 0, "match_epochs": 4, "match_learning_rate": 1e-3, "match_batch_size": 16, "warmup_ratio": 0}
    for follows_text, guard in ((True, True), (False, True), (False, False)):
        folder = tmp_path / f"{follows_text}-{guard}"
        folder.mkdir()
        pairs = [
            write_word_pairs(folder / f"{seed}.parquet", n, seed, follows_text) for seed, n in ((0, 480), (1, 240))
        ]
        settings = make_settings(training=tuning | {"match_guard": guard}, model={"calibration": "platt+match"})
        result = fine_tune(settings, *pairs, folder / "model")
        served = next(saved_match_encoder(result.checkpoint, torch.device("cpu"), 32, 8).model.parameters())
        assert result.match_tuned == (follows_text or not guard) == (not torch.equal(served, base))
        selection = json.loads((result.checkpoint / SELECTION_FILE).read_text())
        assert selection["match_tuned"] == result.match_tuned
        if guard:  # the decision's intervals: tuned minus zero-shot
            assert bool(beyond_the_noise(result.match_gain, better=True)) == follows_text, result.match_gain
            assert not beyond_the_noise(result.match_gain, better=False)
            assert selection["match_gain"]["logloss"]["interval"][1] == result.match_gain["logloss"].high
        else:
            assert result.match_gain == {}


def test_the_cross_encoder_can_start_from_the_tuned_match_encoder(tmp_path, make_settings, toy_pairs):
    def weights(folder: Path, name: str) -> torch.Tensor:  # one transformer weight of a saved model
        model, _ = load_cross_encoder(str(folder), torch.device("cpu"))
        return parameter(model, name).detach()

    name = "encoder.layer.0.attention.self.query.weight"
    for from_match in (True, False):
        training = {"epochs": 0, "cross_encoder_from_match": from_match, "match_learning_rate": 1e-2}
        training |= {"match_guard": False}  # the tuned encoder, whether or not it beats the zero-shot one
        result = fine_tune(make_settings(training=training), *toy_pairs, tmp_path / str(from_match))
        match = saved_match_encoder(result.checkpoint, torch.device("cpu"), 64, 8).model
        tuned = dict(match.named_parameters())[name].detach()
        assert torch.equal(weights(result.checkpoint, name), tuned) == from_match
    with pytest.raises(ValueError, match="cross_encoder_from_match"):
        make_settings(training={"cross_encoder_from_match": True}, model={"calibration": "platt"})
