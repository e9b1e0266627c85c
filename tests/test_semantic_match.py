"""The semantic match: the whole user text's cosine with the ad text, blended with its best item's."""

import json

import numpy as np
import polars as pl
import pytest
import torch

from tasks.config import packaged_model_path
from tasks.semantic_match import (
    MATCH_FILE,
    MATCH_FOLDER,
    PASSED_OVER,
    MatchTuning,
    load_match_encoder,
    save_match_encoder,
    saved_match_encoder,
    text_items,
    tune_match_encoder,
)

USER = (
    "age: 67, gender: female, occupation: retired, recent_searches: couch to 5k week one; mortgage fixed rate. "
    "Recently clicked: Get the memory foam mattress from Nestwell | Try our robot vacuum from Brightside"
)


def test_a_user_text_splits_into_its_profile_fields_searches_and_history_items():
    assert text_items(USER) == [
        "age: 67",
        "gender: female",
        "occupation: retired",
        "recent_searches: couch to 5k week one",
        "mortgage fixed rate",
        "Recently clicked: Get the memory foam mattress from Nestwell",
        "Try our robot vacuum from Brightside",
    ]
    # a comma inside a value (a movie title) is not a field's end: only one before the next "column: " is
    movies = "age: 24, zip: 55106. Recently clicked: Shawshank Redemption, The (1994) | Heat (1995)"
    assert text_items(movies) == ["age: 24", "zip: 55106", "Recently clicked: Shawshank Redemption, The (1994)"] + [
        "Heat (1995)"
    ]
    assert text_items("nothing to split") == ["nothing to split"]
    assert text_items(" | ") == [" | "]  # no item at all: the text itself


def test_the_match_blends_the_whole_texts_cosine_with_its_best_items(tiny_model_dir):
    encoder = load_match_encoder(tiny_model_dir, torch.device("cpu"), 64, 5, item_share=0.25)
    users = [USER, "age: 30; chess", "tent"]
    ads = ["Try our chess clock", "A tent for two", "Get the memory foam mattress from Nestwell"]

    def unit(texts):
        return encoder.embed(texts)

    expected = np.array(
        [
            [0.75 * unit([u])[0] @ unit([a])[0] + 0.25 * max(unit(text_items(u)) @ unit([a])[0]) for a in ads]
            for u in users
        ]
    )
    side = encoder.users(users)
    ad_vectors = unit(ads)
    np.testing.assert_allclose(encoder.scores(side, ad_vectors), expected, rtol=1e-5, atol=1e-6)
    rows, cols = np.array([2, 0, 1, 0, 2]), np.array([1, 2, 0, 0, 2])
    np.testing.assert_allclose(encoder.pair_scores(side, ad_vectors, rows, cols), expected[rows, cols], atol=1e-6)
    np.testing.assert_allclose(encoder.match([users[r] for r in rows], [ads[c] for c in cols]), expected[rows, cols])
    whole_only = load_match_encoder(tiny_model_dir, torch.device("cpu"), 64, 5)
    np.testing.assert_allclose(whole_only.match(users, ads), np.diag(unit(users) @ unit(ads).T), atol=1e-6)

    # the twin tuning trains (torch, differentiable) is the score served; a gradient reaches each user's best item only
    items = torch.from_numpy(side.items).requires_grad_(True)
    trained = encoder.blend(torch.from_numpy(side.whole), items, side.starts, torch.from_numpy(ad_vectors))
    np.testing.assert_allclose(trained.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    trained[:, 0].sum().backward()  # the chess clock: each user's best item against it gets the gradient
    best = [
        side.starts[u] + np.argmax(side.items[side.starts[u] : side.starts[u + 1]] @ ad_vectors[0]) for u in range(3)
    ]
    assert set(np.flatnonzero(items.grad.abs().sum(1).numpy())) == set(best)


def test_tuning_trains_each_click_against_the_batchs_ads_and_the_ads_its_user_passed_over(tiny_model_dir):
    """With logits ~0, a click's loss is log(its unmasked candidates): which ads are negatives, exactly. Another
    click of the same user, or an ad that user clicked in the batch, is no negative; an ad passed over is one
    for every user who did not click it."""
    encoder = load_match_encoder(tiny_model_dir, torch.device("cpu"), 64, 5, item_share=0.5)
    passed = [
        [{"ad_id": "X", "ad_text": "x ad"}],
        [{"ad_id": "X", "ad_text": "x ad"}],
        [{"ad_id": "A", "ad_text": "a ad"}],
    ]
    clicks = pl.DataFrame(
        {
            "user_id": ["u0", "u0", "u1", "u2"],
            "ad_id": ["A", "B", "C", "A"],
            "user_text": ["age: 1, likes: a", "age: 1, likes: a", "age: 2, likes: c", "age: 3"],
            "ad_text": ["a ad", "b ad", "c ad", "a ad"],
            PASSED_OVER: [*passed, None],
        }
    )
    tuning = MatchTuning(epochs=1, batch_size=4, learning_rate=1e-3, scale=1e-9, warmup_ratio=0.0, seed=0)
    # candidates A B C A | X X A: u0's rows keep their own ad, C and both X (4); u1's all 7; u2's B, C, A, X, X (5)
    (loss,) = tune_match_encoder(encoder, clicks, tuning)
    assert loss == pytest.approx((2 * np.log(4) + np.log(7) + np.log(5)) / 4, rel=1e-6)
    (loss,) = tune_match_encoder(encoder, clicks.drop(PASSED_OVER), tuning)  # the other clicks' ads alone
    assert loss == pytest.approx((2 * np.log(2) + np.log(4) + np.log(3)) / 4, rel=1e-6)


def test_a_saved_model_reads_the_match_as_it_was_fitted(tmp_path, tiny_model_dir):
    encoder = load_match_encoder(tiny_model_dir, torch.device("cpu"), 64, 5, item_share=0.5)
    save_match_encoder(encoder, tmp_path)
    assert saved_match_encoder(tmp_path, torch.device("cpu"), 64, 5).item_share == 0.5
    assert json.loads((tmp_path / MATCH_FOLDER / MATCH_FILE).read_text()) == {"item_share": 0.5}
    (tmp_path / MATCH_FOLDER / MATCH_FILE).unlink()  # a version saved before the item share: the whole text
    assert saved_match_encoder(tmp_path, torch.device("cpu"), 64, 5).item_share == 0.0


RUNNER = (
    "age: 34, gender: male, city: Leeds, occupation: nurse, recent_searches: couch to 5k week one; best pastel de "
    "nata in portugal; train or plane to paris. Recently clicked: Introducing the rail pass across Europe from "
    "Wanderly Travel | Get the weekend getaway to Lisbon from Wanderly Travel"
)


def test_with_the_real_minilm_the_best_item_finds_the_searched_product_in_a_long_profile():
    """A runner's one search among travel searches, clicks and profile fields: the whole text's cosine puts
    the fitness tracker first among the topic's products (0.124 against the running plan's 0.120), the blend
    with the best item puts the running plan first, well ahead (0.172 against 0.133)."""
    products = ["30-day running plan", "home kettlebell set", "smart fitness tracker", "yoga mat with alignment lines"]
    ads = [f"Get the {product} from PulseFit." for product in products]  # the same copy but for the product
    whole, blended = (
        load_match_encoder(packaged_model_path(), torch.device("cpu"), 128, 8, item_share=share) for share in (0.0, 0.5)
    )
    whole_scores, blended_scores = (e.scores(e.users([RUNNER]), e.embed(ads))[0] for e in (whole, blended))
    assert whole_scores.argmax() != 0
    assert blended_scores.argmax() == 0 and blended_scores[0] - blended_scores[1:].max() > 0.02
