"""Model behaviour: loss falls, scores follow the text, early stopping, the real pretrained model trains."""

import json
import math
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from tasks.config import packaged_model_path
from tasks.model import (
    Calibration,
    MeanPooledClassifier,
    ad_click_log_odds,
    fit_calibration,
    load_calibration,
    load_cross_encoder,
    predict_ctr,
)
from tasks.train import ad_prior_offsets, epoch_order, fine_tune, pairwise_loss, user_days
from tests.conftest import build_settings

CLICK_AD, SKIP_AD = "Buy trail running shoes now", "Read the quarterly tax report"


def write_toy_pairs(path: Path, n: int, seed: int) -> Path:
    """Pairs whose label is decided by the ad text alone (with a few flipped labels)."""
    rng = np.random.default_rng(seed)
    is_click_ad = rng.random(n) < 0.3
    users = [
        f"age: {a}, city: {c}. Recently clicked: nothing yet"
        for a, c in zip(rng.integers(18, 80, n), rng.choice(["Leeds", "York", "Bath"], n), strict=True)
    ]
    labels = is_click_ad ^ (rng.random(n) < 0.05)
    impressions = rng.integers(0, 50, n)
    pl.DataFrame(
        {
            "ad_id": np.where(is_click_ad, "click-ad", "skip-ad"),
            "user_text": users,
            "ad_text": np.where(is_click_ad, CLICK_AD, SKIP_AD),
            "is_clicked": labels,
            "user_prior_impressions": impressions,
            "user_prior_clicks": rng.binomial(impressions, 0.3),
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
    # lr 0 cannot improve the validation logloss: the first validation after step 0 is a miss
    settings = make_settings(
        training={"epochs": 5, "batch_size": 64, "learning_rate": 0.0, "patience": 1, "eval_every_steps": 2}
    )
    result = fine_tune(settings, *toy_pairs, tmp_path / "ckpt")
    assert result.stopped_early
    assert result.steps == 2
    assert [row["step"] for row in result.history] == [0, 2]


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
                "ad_id": ["a"] * n,
                "user_text": ["a user"] * n,
                "ad_text": ["an ad"] * n,
                "is_clicked": rng.random(n) < rate,
                "user_prior_impressions": [200] * n,
                "user_prior_clicks": (200 * rate).astype(int),
            }
        )
        frames[name].write_parquet(tmp_path / f"{name}.parquet")
    paths = tmp_path / "train.parquet", tmp_path / "valid.parquet"
    fresh = {"epochs": 0}  # the fresh head only: the offset is the one difference
    without = fine_tune(make_settings(training=fresh), *paths, tmp_path / "a").history[0]["valid_raw_logloss"]
    offset = {**fresh, "user_prior_offset": True}
    with_offset = fine_tune(make_settings(training=offset), *paths, tmp_path / "b").history[0]["valid_raw_logloss"]
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


def test_ad_click_log_odds_shrinks_towards_the_global_rate():
    log_odds, default = ad_click_log_odds(["a", "a", "a", "b"], np.array([1.0, 1.0, 0.0, 0.0]), strength=2.0)
    assert default == pytest.approx(0.0)  # global rate 2/4
    assert log_odds["a"] == pytest.approx(np.log(0.6 / 0.4))  # (2 + 2 * 0.5) / (3 + 2)
    assert log_odds["b"] == pytest.approx(np.log((1 / 3) / (2 / 3)))  # (0 + 1) / (1 + 2)


def test_ad_prior_weight_is_fitted_and_unseen_ads_get_the_global_rate():
    rng = np.random.default_rng(1)
    ads = rng.choice(["hit", "flop"], 20000)
    logits = rng.normal(0, 1, 20000)
    ad_term = np.where(ads == "hit", 1.0, -1.0)
    labels = (rng.random(20000) < 1 / (1 + np.exp(-(logits + 0.8 * ad_term)))).astype(int)
    prior = Calibration(ad_log_odds={"hit": 1.0, "flop": -1.0}, default_ad_log_odds=0.0)
    calibration = fit_calibration(logits, labels, ads.tolist(), prior)
    assert calibration.ad_weight == pytest.approx(0.8, abs=0.06)
    assert calibration.slope == pytest.approx(1.0, abs=0.06)
    hit, new, no_ids = calibration.apply(np.zeros(1), ["hit"]), calibration.apply(np.zeros(1), ["new"]), None
    assert hit[0] > new[0] == pytest.approx(calibration.apply(np.zeros(1), no_ids)[0])


def test_user_prior_weight_is_fitted_and_unseen_ads_get_weights_fitted_without_the_ad_prior():
    rng = np.random.default_rng(2)
    n = 40000
    ads = rng.choice(["hit", "flop"], n)
    ad_term = np.where(ads == "hit", 1.0, -1.0)
    logits = ad_term + rng.normal(0, 1, n)  # the text reads the ad's quality, with noise
    user_rate = rng.uniform(0.2, 0.8, n)
    user_log_odds = np.log(user_rate / (1 - user_rate))
    impressions = np.full(n, 10**7)  # long histories: shrinkage is negligible
    history = (np.round(user_rate * impressions), impressions)
    labels = (rng.random(n) < 1 / (1 + np.exp(-(0.5 * logits + 0.8 * ad_term + 0.7 * user_log_odds)))).astype(int)
    prior = Calibration(ad_log_odds={"hit": 1.0, "flop": -1.0}, user_prior_strength=20.0)
    calibration = fit_calibration(logits, labels, ads.tolist(), prior, history)
    assert calibration.slope == pytest.approx(0.5, abs=0.06)
    assert calibration.ad_weight == pytest.approx(0.8, abs=0.08)
    assert calibration.user_weight == pytest.approx(0.7, abs=0.06)
    # without the ad prior, the text's logit carries the ad's quality: a steeper slope for unseen ads
    assert calibration.unseen_slope > calibration.slope + 0.2
    assert calibration.unseen_user_weight == pytest.approx(0.7, abs=0.1)
    # a user with 3 clicks in 4 impressions: (3 + 20 * 0.5) / (4 + 20), the global rate being 0.5 here
    user_rate = (3 + 20 * 0.5) / (4 + 20)
    z = calibration.unseen_slope * 0.3 + calibration.unseen_intercept
    z += calibration.unseen_user_weight * np.log(user_rate / (1 - user_rate))
    assert calibration.apply(np.array([0.3]), ["new"], ([3], [4]))[0] == pytest.approx(1 / (1 + np.exp(-z)))
    # no history: a user with no impressions gets the global rate (log-odds 0 here)
    no_history = calibration.apply(np.array([0.3]), ["new"])[0]
    z0 = calibration.unseen_slope * 0.3 + calibration.unseen_intercept
    assert no_history == pytest.approx(1 / (1 + np.exp(-z0)))


def test_a_calibration_saved_before_the_user_prior_scores_as_it_did(tmp_path):
    old = {"slope": 2.0, "intercept": -1.0, "ad_weight": 0.5, "default_ad_log_odds": 0.2, "ad_log_odds": {"a": 1.0}}
    (tmp_path / "calibration.json").write_text(json.dumps(old))
    calibration = load_calibration(tmp_path)
    got = calibration.apply(np.array([0.1, 0.1]), ["a", "new"], (np.array([9, 9]), np.array([10, 10])))
    z = 2.0 * 0.1 - 1.0 + 0.5 * np.array([1.0, 0.2])
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-z)))


def test_fine_tuning_saves_a_calibration_that_is_used_when_loading(tmp_path, make_settings, toy_pairs):
    hybrid = load_calibration(fine_tune(make_settings(training={"epochs": 1}), *toy_pairs, tmp_path / "a").checkpoint)
    assert set(hybrid.ad_log_odds) == {"click-ad", "skip-ad"} and hybrid.ad_weight > 0  # default: text + ad prior
    assert hybrid.ad_log_odds["click-ad"] > hybrid.default_ad_log_odds > hybrid.ad_log_odds["skip-ad"]

    settings = make_settings(training={"epochs": 1}, model={"calibration": "platt"})
    platt = load_calibration(fine_tune(settings, *toy_pairs, tmp_path / "b").checkpoint)
    assert platt.slope > 0 and platt.ad_weight == 0 and not platt.ad_log_odds
    assert load_calibration(tmp_path) == Calibration()  # no file: identity


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
            return json.loads(path.read_text())["steps"]
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


def test_ad_prior_offset_leaves_each_training_pair_out_of_its_own_ads_counts(make_settings):
    train = pl.DataFrame({"ad_id": ["a", "a", "a", "b"], "is_clicked": [True, True, False, False]})
    settings = make_settings(
        model={"ad_prior_strength": 2.0}, training={"ad_prior_offset": True, "ad_prior_offset_dropout": 0.0}
    )
    rate = 0.5
    log_odds = lambda p: math.log(p / (1 - p))  # noqa: E731
    # pair 0: a's other impressions are 1 click in 2 -> (1 + 2 * 0.5) / (2 + 2); pair 3: b has no other one
    offsets = ad_prior_offsets(settings, train, train, in_train=True)
    assert offsets[0] == pytest.approx(log_odds((1 + 1) / (2 + 2)) - log_odds(rate))
    assert offsets[2] == pytest.approx(log_odds((2 + 1) / (2 + 2)) - log_odds(rate))
    assert offsets[3] == pytest.approx(0.0)
    # a validation pair sees all of training; an unseen ad the global rate (offset 0)
    valid = pl.DataFrame({"ad_id": ["a", "new"], "is_clicked": [True, False]})
    assert ad_prior_offsets(settings, train, valid).tolist() == pytest.approx([log_odds(3 / 5) - 0.0, 0.0])
    dropped = make_settings(training={"ad_prior_offset": True, "ad_prior_offset_dropout": 1.0})
    assert not ad_prior_offsets(dropped, train, train, in_train=True).any()
    assert not ad_prior_offsets(make_settings(), train, train, in_train=True).any()  # off by default


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
