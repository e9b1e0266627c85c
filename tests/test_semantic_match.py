"""The semantic match: the whole user text's cosine with the ad text, blended with its best item's."""

import json

import numpy as np
import torch

from tasks.config import packaged_model_path
from tasks.semantic_match import (
    MATCH_FILE,
    MATCH_FOLDER,
    load_match_encoder,
    save_match_encoder,
    saved_match_encoder,
    text_items,
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
