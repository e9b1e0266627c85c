"""Two-stage scoring: stage 1 (two-tower) + stage 2 (cross-encoder), on the tiny BERT."""

from __future__ import annotations

import shutil
from dataclasses import replace
from datetime import date

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

from tasks import two_tower
from tasks.affinity import with_similar
from tasks.config import RankingConfig, packaged_model_path
from tasks.model import load_cross_encoder, predict_logits
from tasks.output_layer import Calibration, PairPriors
from tasks.pairs import RankingInputs
from tasks.score import (
    RankingModel,
    ScoringStats,
    prepare_stage1,
    project_users,
    score_candidates,
    stage1_scores,
)
from tasks.semantic_match import load_match_encoder, with_match
from tasks.two_tower import TwoTower, distill_two_tower, load_two_tower

N_USERS, N_ADS = 11, 30
AD_COUNTS = {3: (100_000, 99_900), 7: (5_000, 0), 11: (400, 150), 12: (80, 20)}  # ad -> (impressions, clicks)
MATCH_TOPICS = ["trail running shoes", "quarterly tax forms"]
TOPICS = ["running shoes", "tax forms", "garden tools", "coffee beans", "city breaks", "board games"]


@pytest.fixture(scope="module")
def ranking_model(tiny_model_dir) -> RankingModel:
    model, tokenizer = load_cross_encoder(str(tiny_model_dir), torch.device("cpu"))
    torch.manual_seed(3)
    references = ["age: 40. Recently clicked: tax forms", "age: 22. Recently clicked: board games"]
    tower = TwoTower(model.config.hidden_size, dim=8, reference_user_texts=references).eval()
    # the full output layer: ad prior, user prior, and other weights for cold ads (see inputs: ad counts)
    calibration = Calibration(
        slope=2.0,
        ad_weight=0.5,
        ad_prior_strength=5.0,
        global_log_odds=-1.0,
        user_weight=0.3,
        unseen_slope=2.5,
        unseen_intercept=-0.5,
        unseen_user_weight=1.5,
    )
    return RankingModel(model, tokenizer, calibration, tower, max_length=64, batch_size=7)


@pytest.fixture(scope="module")
def inputs() -> RankingInputs:
    users = [f"age: {20 + i}. Recently clicked: {TOPICS[i % len(TOPICS)]}" for i in range(N_USERS)]
    users[5] = users[4]  # identical user texts are scored once and ranked alike
    ads = [f"{TOPICS[j % len(TOPICS)]} deal number {j}" for j in range(N_ADS)]
    return RankingInputs(
        date(2026, 1, 1),
        pl.DataFrame(
            {
                "user_id": [f"u{i:02d}" for i in range(N_USERS)],
                "user_text": users,
                "user_prior_impressions": [7 * i for i in range(N_USERS)],
                "user_prior_clicks": [3 * i + i % 3 for i in range(N_USERS)],
            }
        ),
        pl.DataFrame(
            {
                "ad_id": [f"ad-{j:02d}" for j in range(N_ADS)],
                "ad_text": ads,
                # ad-03 nearly always clicked, ad-07 never, ad-11 and ad-12 middling; the rest cold (never shown)
                "ad_prior_impressions": [AD_COUNTS.get(j, (0, 0))[0] for j in range(N_ADS)],
                "ad_prior_clicks": [AD_COUNTS.get(j, (0, 0))[1] for j in range(N_ADS)],
            }
        ),
    )


def run(model, inputs, tmp_path, name: str, **ranking) -> tuple[pl.DataFrame, object]:
    config = RankingConfig(**({"top_n": 5, "user_chunk_size": 4} | ranking))
    stats = score_candidates(model, inputs, config, tmp_path / f"{name}.parquet")
    return pl.from_arrow(pq.read_table(tmp_path / f"{name}.parquet")), stats


def test_k_at_least_the_ads_is_exactly_the_exhaustive_ranking(ranking_model, inputs, tmp_path):
    exhaustive, stats = run(ranking_model, inputs, tmp_path, "all", candidates_k=None)
    assert not stats.two_stage and stats.stage2_pairs == N_USERS * N_ADS
    assert stats.stage2_unique_texts == (N_USERS - 1) * N_ADS  # users 4 and 5 share a text
    same, stats_k = run(ranking_model, inputs, tmp_path, "k", candidates_k=N_ADS)
    assert not stats_k.two_stage
    assert same.equals(exhaustive)
    assert exhaustive.height == N_USERS * 5 and exhaustive.select("user_id", "ad_id").is_unique().all()
    # the ad prior of the calibration moves ad-03 up for every user
    assert exhaustive.filter(pl.col("ad_id") == "ad-03").height == N_USERS


def test_two_stage_rescores_k_per_user_with_the_cross_encoder(ranking_model, inputs, tmp_path):
    exhaustive, _ = run(ranking_model, inputs, tmp_path, "all", candidates_k=None, top_n=N_ADS)
    two_stage, stats = run(ranking_model, inputs, tmp_path, "two", candidates_k=8, top_n=8)
    assert stats.two_stage and stats.stage1_pairs == N_USERS * N_ADS and stats.stage2_pairs == N_USERS * 8
    assert stats.anchor_pairs == 2 * N_ADS  # each ad scored against the two reference users
    assert two_stage.group_by("user_id").len()["len"].to_list() == [8] * N_USERS
    # stage 2's scores are the cross-encoder's: the same pCTR as in the exhaustive run for the same pair
    joined = two_stage.join(exhaustive, on=["user_id", "ad_id"], suffix="_all")
    assert joined.height == two_stage.height
    np.testing.assert_allclose(joined["pctr"], joined["pctr_all"], rtol=1e-5)


def test_a_layer_without_the_logit_ranks_by_its_other_terms_without_running_the_cross_encoder(
    ranking_model, inputs, tmp_path
):
    """Fine-tuning kept step 0: the layer's slopes are 0, so rerank scores the priors (and match) alone."""
    layer = replace(ranking_model.calibration, slope=0.0, unseen_slope=0.0)
    model = replace(ranking_model, calibration=layer)
    calls = []
    hook = model.cross_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        two_stage, stats = run(model, inputs, tmp_path, "two", candidates_k=8, top_n=8)
        exhaustive, _ = run(model, inputs, tmp_path, "all", candidates_k=None, top_n=N_ADS)
    finally:
        hook.remove()
    assert not calls and stats.anchor_pairs == stats.stage2_unique_texts == 0 and stats.stage2_pairs == N_USERS * 8
    users, ads = inputs.users, inputs.ads
    pairs = pl.concat(
        [users.select(pl.all().repeat_by(ads.height).explode()), pl.concat([ads] * users.height)], how="horizontal"
    )
    expected = pairs.select("user_id", "ad_id").with_columns(
        pctr_layer=layer.apply(np.zeros(pairs.height), PairPriors.of(pairs))
    )
    joined = exhaustive.join(expected, on=["user_id", "ad_id"])
    assert joined.height == N_USERS * N_ADS and joined["pctr"].std() > 0.01
    np.testing.assert_allclose(joined["pctr"], joined["pctr_layer"], rtol=1e-6)
    ranked = two_stage.join(expected, on=["user_id", "ad_id"])  # stage 2 serves the layer's pCTR too
    assert ranked.height == N_USERS * 8
    np.testing.assert_allclose(ranked["pctr"], ranked["pctr_layer"], rtol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, N_USERS, 100])
def test_chunk_boundaries_neither_drop_nor_duplicate_pairs(ranking_model, inputs, tmp_path, chunk):
    every = {"candidates_k": None, "top_n": N_ADS}
    reference, _ = run(ranking_model, inputs, tmp_path, "ref", **every)
    chunked, stats = run(ranking_model, inputs, tmp_path, f"c{chunk}", **every, user_chunk_size=chunk)
    assert stats.rows == chunked.height == N_USERS * N_ADS
    assert chunked.select("user_id", "ad_id").is_unique().all()
    joined = chunked.join(reference, on=["user_id", "ad_id"], suffix="_ref")
    assert joined.height == N_USERS * N_ADS
    # batches differ with the chunk size; scores agree to float rounding
    np.testing.assert_allclose(joined["pctr"], joined["pctr_ref"], rtol=1e-5)


def test_two_stage_runs_repeat_exactly(ranking_model, inputs, tmp_path):
    first, _ = run(ranking_model, inputs, tmp_path, "first", candidates_k=10)
    second, _ = run(ranking_model, inputs, tmp_path, "second", candidates_k=10)
    assert first.equals(second) and first.height == N_USERS * 5


def test_ecpm_ranks_by_pctr_times_bid_in_both_stages(ranking_model, inputs, tmp_path):
    bids = np.linspace(0.1, 3.0, N_ADS)
    bids[3] = 0.01  # ad-03, every user's first by pCTR (its ad prior), bids almost nothing
    priced = replace(inputs, ads=inputs.ads.with_columns(pl.Series("bid", bids)))
    by_pctr, _ = run(ranking_model, priced, tmp_path, "pctr", candidates_k=None, top_n=N_ADS)
    assert by_pctr["ecpm"].is_null().all()
    exhaustive, _ = run(ranking_model, priced, tmp_path, "ecpm", candidates_k=None, top_n=N_ADS, objective="ecpm")
    bid = dict(zip(priced.ads["ad_id"], bids, strict=True))
    expected = exhaustive["pctr"] * exhaustive["ad_id"].replace_strict(bid) * 1000
    np.testing.assert_allclose(exhaustive["ecpm"], expected, rtol=1e-9)
    for _, ranked in exhaustive.group_by("user_id"):
        assert ranked["ecpm"].to_list() == sorted(ranked["ecpm"].to_list(), reverse=True)
    top = {u: r["ad_id"][0] for (u,), r in exhaustive.group_by("user_id")}
    assert top != {u: r["ad_id"][0] for (u,), r in by_pctr.group_by("user_id")}  # the bids changed the order
    # stage 1 keeps the top of the exhaustive ecpm ranking (log-odds + log bid); stage 2 scores it alike
    two_stage, stats = run(ranking_model, priced, tmp_path, "two", candidates_k=12, top_n=3, objective="ecpm")
    assert stats.two_stage
    joined = two_stage.join(exhaustive, on=["user_id", "ad_id"], suffix="_all")
    np.testing.assert_allclose(joined["ecpm"], joined["ecpm_all"], rtol=1e-5)


def test_candidates_table_restricts_each_users_ads(ranking_model, inputs, tmp_path):
    allowed = pl.DataFrame(
        {"user_id": ["u00", "u00", "u00", "u01", "u01"], "ad_id": ["ad-01", "ad-02", "ad-29", "ad-03", "gone"]}
    )
    restricted = RankingInputs(inputs.run_date, inputs.users, inputs.ads, allowed)
    for k in (None, 10):  # exhaustive and two-stage
        ranked, _ = run(ranking_model, restricted, tmp_path, f"cand{k}", candidates_k=k)
        assert dict(ranked.group_by("user_id").agg(pl.col("ad_id").sort()).iter_rows()) == {
            "u00": ["ad-01", "ad-02", "ad-29"],
            "u01": ["ad-03"],  # "gone" is not an active ad
        }


def write_match_pairs(path, n: int, seed: int):
    """Pairs whose click is decided by the user and the ad together: a user clicks the ads of their own
    interest (5% of labels flipped). Every ad is clicked by half the users: no ad-only score ranks them."""
    rng = np.random.default_rng(seed)
    interest, topic = rng.integers(0, 2, n), rng.integers(0, 2, n)
    labels = (interest == topic) ^ (rng.random(n) < 0.05)
    pl.DataFrame(
        {
            "user_id": [f"u{u}" for u in rng.integers(0, 60, n)],
            "ad_id": [f"ad{t}-{j}" for t, j in zip(topic, rng.integers(0, 3, n), strict=True)],
            "user_text": [
                f"age: {a}. Recently clicked: {MATCH_TOPICS[i]}"
                for a, i in zip(rng.integers(18, 80, n), interest, strict=True)
            ],
            "ad_text": [f"{MATCH_TOPICS[t]} offer {j}" for t, j in zip(topic, rng.integers(0, 3, n), strict=True)],
            "is_clicked": labels,
            "user_prior_impressions": np.zeros(n, dtype=np.int64),
            "user_prior_clicks": np.zeros(n, dtype=np.int64),
            "ad_prior_impressions": np.zeros(n, dtype=np.int64),
            "ad_prior_clicks": np.zeros(n, dtype=np.int64),
        }
    ).write_parquet(path)
    return path


def test_distilled_two_tower_orders_each_users_ads_like_the_cross_encoder(tmp_path, make_settings, monkeypatch):
    train = write_match_pairs(tmp_path / "train.parquet", 512, 1)
    settings = make_settings(stage1={"distill_users": 60, "distill_ads_per_user": 10, "dim": 8})

    def matching_teacher(model, tokenizer, user_texts, ad_texts, *args) -> np.ndarray:
        """A cross-encoder that learned the match: +2 where the ad is of the user's interest, else -2, plus a
        small per-ad offset. Users differ; ads alone do not order any user's ads."""
        match = [(MATCH_TOPICS[0] in u) == (MATCH_TOPICS[0] in a) for u, a in zip(user_texts, ad_texts, strict=True)]
        offset = [0.1 * int(a[-1]) for a in ad_texts]
        return np.where(match, 2.0, -2.0) + np.asarray(offset)

    monkeypatch.setattr(two_tower, "predict_logits", matching_teacher)
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(settings.model.base_model, checkpoint)
    result = distill_two_tower(settings, checkpoint, train)
    assert result.pairs == 600
    # each held-out user's ads in the teacher's order; an ad-only tower scores about 0 on this data
    assert result.holdout_user_spearman > 0.6, result
    tower = load_two_tower(checkpoint)
    assert isinstance(tower, TwoTower) and tower.user.out_features == 8
    assert len(tower.reference_user_texts) == 8 and len(set(tower.reference_user_texts)) == 8
    assert load_two_tower(tmp_path) is None


def test_int8_quantised_cross_encoder_scores_close_to_fp32_and_ranks_alike(ranking_model, inputs, tmp_path):
    # the packaged MiniLM: the tiny random BERT's texts are near ties that any noise reorders, a pretrained
    # encoder's are not (its [CLS] differs by text); the head is fresh (seeded) and the output layer the fixture's
    torch.manual_seed(0)
    encoder, tokenizer = load_cross_encoder(packaged_model_path(), torch.device("cpu"))
    model = replace(ranking_model, cross_encoder=encoder, tokenizer=tokenizer, two_tower=None)
    fp32, _ = run(model, inputs, tmp_path, "fp32", candidates_k=None, top_n=N_ADS)
    int8_model = model.quantized()
    assert isinstance(model.cross_encoder.classifier, torch.nn.Linear)  # the original stays fp32
    assert not isinstance(int8_model.cross_encoder.classifier, torch.nn.Linear)
    int8, _ = run(int8_model, inputs, tmp_path, "int8", candidates_k=None, top_n=N_ADS)
    joined = int8.join(fp32, on=["user_id", "ad_id"], suffix="_fp32")
    assert joined.height == N_USERS * N_ADS
    np.testing.assert_allclose(joined["pctr"], joined["pctr_fp32"], atol=0.02)
    # what rerank publishes: each user's top 10 by int8 is mostly the top 10 by fp32
    top10 = {
        name: dict(frame.sort("pctr", descending=True).group_by("user_id").agg(pl.col("ad_id").head(10)).iter_rows())
        for name, frame in (("int8", int8), ("fp32", fp32))
    }
    overlap = [len(set(top10["int8"][u]) & set(top10["fp32"][u])) / 10 for u in top10["fp32"]]
    # measured: 0.8 on average, 0.6 at worst (a fresh head on MiniLM); a reordering int8 path keeps ~1/3
    assert len(overlap) == N_USERS and np.mean(overlap) >= 0.7 and min(overlap) >= 0.5, overlap


def test_a_two_tower_without_reference_users_ranks_with_its_learned_ad_bias(ranking_model, inputs, tmp_path):
    plain = TwoTower(ranking_model.two_tower.user.in_features, dim=8).eval()
    ranked, stats = run(replace(ranking_model, two_tower=plain), inputs, tmp_path, "plain", candidates_k=8)
    assert stats.two_stage and stats.anchor_pairs == 0 and stats.stage2_pairs == N_USERS * 8
    assert ranked.height == N_USERS * 5


class MeanTokenEmbedding(torch.nn.Module):
    """A text's token vectors (an embedding table): what embed_texts mean-pools into a text vector."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.embeddings = torch.nn.Embedding(vocab_size, hidden_size)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.embeddings(input_ids))


class BilinearCrossEncoder(torch.nn.Module):
    """A cross-encoder that a two-tower can reproduce exactly: logit = (U e_user) . (A e_ad), where e_user and
    e_ad are the mean token vectors of each text as it is encoded alone ([CLS] text [SEP])."""

    def __init__(self, vocab_size: int, hidden_size: int, dim: int, cls_token_id: int):
        super().__init__()
        self.config = type("Config", (), {"hidden_size": hidden_size})()
        self.base_model = MeanTokenEmbedding(vocab_size, hidden_size)
        self.user, self.ad = (
            torch.nn.Linear(hidden_size, dim, bias=False),
            torch.nn.Linear(hidden_size, dim, bias=False),
        )
        self.cls_token_id = cls_token_id

    def forward(self, input_ids, attention_mask, token_type_ids) -> SequenceClassifierOutput:
        tokens = self.base_model(input_ids).last_hidden_state  # (batch, seq, hidden)
        user_mask = (attention_mask * (token_type_ids == 0)).unsqueeze(-1).float()  # [CLS] user [SEP]
        ad_mask = (attention_mask * (token_type_ids == 1)).unsqueeze(-1).float()  # ad [SEP]: [CLS] added back
        cls = self.base_model(torch.full_like(input_ids[:, :1], self.cls_token_id)).last_hidden_state[:, 0]
        e_user = (tokens * user_mask).sum(1) / user_mask.sum(1)
        e_ad = ((tokens * ad_mask).sum(1) + cls) / (ad_mask.sum(1) + 1)
        return SequenceClassifierOutput(logits=(self.user(e_user) * self.ad(e_ad)).sum(-1, keepdim=True))


def test_a_tower_that_reproduces_the_cross_encoder_gives_stage1_the_log_odds_of_stage2(
    ranking_model, inputs, tiny_model_dir
):
    """Exact for every term of the output layer, the semantic match included (its own weight for cold ads)."""
    tokenizer = ranking_model.tokenizer
    torch.manual_seed(11)
    cross_encoder = BilinearCrossEncoder(tokenizer.vocab_size, 16, 6, tokenizer.cls_token_id).eval()
    tower = TwoTower(16, 6, reference_user_texts=["age: 40. Recently clicked: tax forms", "age: 61"]).eval()
    with torch.no_grad():  # the towers are the cross-encoder's own projections; no biases
        torch.nn.init.normal_(cross_encoder.user.weight)
        torch.nn.init.normal_(cross_encoder.ad.weight)
        tower.user.weight.copy_(cross_encoder.user.weight)
        tower.ad.weight.copy_(cross_encoder.ad.weight)
        for layer in (tower.user, tower.ad, tower.user_bias, tower.ad_bias):
            layer.bias.zero_()
        tower.user_bias.weight.zero_()
        tower.ad_bias.weight.zero_()
    calibration = replace(ranking_model.calibration, match_weight=1.5, unseen_match_weight=-4.0)
    match_encoder = load_match_encoder(tiny_model_dir, torch.device("cpu"), 64, 7, item_share=0.5)
    model = replace(
        ranking_model,
        cross_encoder=cross_encoder,
        two_tower=tower,
        calibration=calibration,
        match_encoder=match_encoder,
    )
    users, ads = inputs.users, inputs.ads

    stage1_ads = prepare_stage1(model, ads, ScoringStats())
    user_match = match_encoder.users(users["user_text"].to_list())
    stage1 = stage1_scores(model, users, project_users(model, users), stage1_ads, user_match)  # (users, ads)
    repeated = users.select(pl.all().repeat_by(ads.height).explode())
    logits = predict_logits(
        cross_encoder, tokenizer, repeated["user_text"], np.tile(ads["ad_text"].to_numpy(), users.height), 64, 7
    )
    pairs = with_match(pl.concat([repeated, pl.concat([ads] * users.height)], how="horizontal"), match_encoder)
    stage2 = calibration.log_odds(logits, PairPriors.of(pairs)).reshape(users.height, ads.height)
    match_term = stage2 - replace(calibration, match_weight=0.0, unseen_match_weight=0.0).log_odds(
        logits, PairPriors.of(pairs)
    ).reshape(users.height, ads.height)
    assert np.abs(match_term).std() > 0.05  # the match moves the scores: the check below covers it

    seen = ~calibration.is_cold(PairPriors.of(ads))
    assert seen.any() and (~seen).any() and logits.std() > 0.1
    np.testing.assert_allclose(stage1[:, seen], stage2[:, seen], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stage1[:, ~seen], stage2[:, ~seen], rtol=1e-4, atol=1e-4)


def test_the_affinity_term_is_exact_in_both_stages(ranking_model, inputs, tiny_model_dir, tmp_path):
    """Each user's past impressions (an ad no longer active among them) against every ad: rerank's matrix
    products give every pair the pCTR of the layer on that pair's own similar counts (tasks/affinity.py)."""
    shown_ads = pl.DataFrame({"ad_id": ["ad-03", "ad-12", "retired"], "ad_text": ["tax forms deal", "x", "running"]})
    past = [["ad-03", "retired", "ad-03"][: i % 4] for i in range(N_USERS)]
    users = inputs.users.with_columns(
        pl.Series("shown_ad_ids", past), pl.Series("shown_clicked", [[j % 2 == 0 for j in range(len(p))] for p in past])
    )
    ranked_inputs = replace(inputs, users=users, shown_ads=shown_ads)
    layer = replace(
        ranking_model.calibration,
        slope=0.0,
        unseen_slope=0.0,
        affinity_weight=1.2,
        exposure_weight=0.4,
        evidence_weight=0.3,
        unseen_affinity_weight=2.0,
        affinity_bandwidth=0.2,
    )
    match_encoder = load_match_encoder(tiny_model_dir, torch.device("cpu"), 64, 7)
    model = replace(ranking_model, calibration=layer, match_encoder=match_encoder)
    exhaustive, _ = run(model, ranked_inputs, tmp_path, "all", candidates_k=None, top_n=N_ADS)
    two_stage, _ = run(model, ranked_inputs, tmp_path, "two", candidates_k=6, top_n=6)

    pairs = pl.concat(
        [users.select(pl.all().repeat_by(inputs.ads.height).explode()), pl.concat([inputs.ads] * N_USERS)],
        how="horizontal",
    )
    pairs = with_similar(pairs, match_encoder, 0.2, shown_ads)
    assert pairs["similar_impressions"].max() > 0.5
    expected = pairs.select("user_id", "ad_id").with_columns(
        pctr_layer=layer.apply(np.zeros(pairs.height), PairPriors.of(pairs)),
        pctr_without=replace(
            layer, affinity_weight=0.0, exposure_weight=0.0, evidence_weight=0.0, unseen_affinity_weight=0.0
        ).apply(np.zeros(pairs.height), PairPriors.of(pairs.drop("similar_impressions", "similar_clicks"))),
    )
    joined = exhaustive.join(expected, on=["user_id", "ad_id"])
    assert joined.height == N_USERS * N_ADS
    np.testing.assert_allclose(joined["pctr"], joined["pctr_layer"], rtol=1e-6)
    assert (joined["pctr_layer"] - joined["pctr_without"]).abs().max() > 0.05  # the term moves the scores
    # stage 1 is exact too (no logit here): the two-stage top 6 are the exhaustive top 6, at the same pCTR
    top = exhaustive.group_by("user_id", maintain_order=True).head(6)
    assert two_stage.select("user_id", "ad_id").equals(top.select("user_id", "ad_id"))
    np.testing.assert_allclose(two_stage["pctr"], top["pctr"], rtol=1e-6)
    with pytest.raises(ValueError, match="shown_ad_ids"):
        run(model, inputs, tmp_path, "missing", candidates_k=None)
