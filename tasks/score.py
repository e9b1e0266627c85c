"""Rank active ads for active users with a registered model, in two stages.

Stage 1 (tasks/two_tower.py): each ad is encoded once and anchored once (the cross-encoder against a
few reference users); each chunk of users is encoded once; one matrix product gives every user x ad
score of the chunk, and each user keeps the top K. Stage 2: the cross-encoder rescores those K
(identical text pairs once). Each chunk's top N per user is appended to a Parquet file as soon as it
is scored, so memory holds one chunk, never all pairs. With K >= ads, or a model without a two-tower,
stage 2 scores every pair: the exhaustive ranking. The affinity term (tasks/affinity.py) is exact in both
stages: each chunk's users' past impressions against every ad, two matrix products.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedTokenizerBase

from tasks.affinity import similar_grid
from tasks.config import RankingConfig
from tasks.model import embed_texts, predict_logits, quantize_int8
from tasks.output_layer import (
    AD_PRIOR_COLUMNS,
    MATCH_COLUMN,
    SIMILAR_COLUMNS,
    USER_PRIOR_COLUMNS,
    Calibration,
    PairPriors,
)
from tasks.pairs import RankingInputs
from tasks.progress import StageProgress
from tasks.semantic_match import MatchEncoder, UserMatch
from tasks.two_tower import TwoTower

# pairs tokenised and length-sorted together in stage 2; large enough that padding stays small
STAGE2_BLOCK_PAIRS = 8192
SCORES_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("ad_id", pa.string()), ("pctr", pa.float64()), ("ecpm", pa.float64())]
)
IMPRESSIONS_PER_ECPM = 1000  # eCPM: expected revenue per thousand impressions = pCTR x bid x 1000


@dataclass
class RankingModel:
    """The parts of a registered model that ranking uses (see tasks/ctr_pyfunc.py)."""

    cross_encoder: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    calibration: Calibration
    two_tower: TwoTower | None
    max_length: int
    batch_size: int
    match_encoder: MatchEncoder | None = None  # the semantic match's encoder, as fitted (None: no match term)

    @classmethod
    def from_pyfunc(cls, model: mlflow.pyfunc.PyFuncModel, quantize: bool = False) -> RankingModel:
        inner = model.unwrap_python_model()
        two_tower = getattr(inner, "two_tower", None)  # versions registered before two-stage ranking have none
        match_encoder = getattr(inner, "match_encoder", None)  # and before the semantic match
        ranker = cls(
            inner.model,
            inner.tokenizer,
            inner.calibration,
            two_tower,
            inner.max_length,
            inner.batch_size,
            match_encoder,
        )
        return ranker.quantized() if quantize else ranker

    def quantized(self) -> RankingModel:
        """A copy with an int8 dynamically quantised cross-encoder; on CUDA (bf16 already) the same model."""
        if next(self.cross_encoder.parameters()).device.type != "cpu":
            return self
        return replace(self, cross_encoder=quantize_int8(self.cross_encoder))


@dataclass(frozen=True)
class ShownAds:
    """The ads the users were shown before (the affinity term): each one's row in vectors, its unit embedding."""

    rows: dict[str, int]
    vectors: np.ndarray  # (shown ads, hidden): the match encoder's


@dataclass
class ScoringStats:
    users: int = 0
    ads: int = 0
    two_stage: bool = False
    anchor_pairs: int = 0  # reference user x ad cross-encoder passes anchoring stage 1
    stage1_pairs: int = 0  # user x ad scores from the matrix product
    stage2_pairs: int = 0  # (user, ad) pairs ranked by the cross-encoder
    stage2_unique_texts: int = 0  # distinct (user_text, ad_text) the cross-encoder actually ran on
    rows: int = 0
    seconds: dict[str, float] = field(
        default_factory=lambda: {"encode": 0.0, "anchor": 0.0, "stage1": 0.0, "stage2": 0.0}
    )


@dataclass
class StageOneAds:
    """What stage 1 needs of the ads, computed once a run."""

    projections: np.ndarray  # (ads, dim): the two-tower's Q(ad), times the ad's slope in the output layer
    terms: np.ndarray  # (ads,): slope * anchor (or learned ad bias) + intercept + ad prior, exact per ad
    user_weights: np.ndarray  # (ads,): the weight of the user prior for each ad (seen, unseen in training)
    reference: np.ndarray  # (dim,): mean P(reference users), subtracted from every user's P
    ad_match: np.ndarray | None = None  # (ads, hidden): the semantic match's unit embeddings (None: no match)
    match_weights: np.ndarray | None = None  # (ads,): the match's weight for each ad (seen, unseen in training)
    ad_counts: tuple[np.ndarray, np.ndarray] | None = None  # the ads' prior counts (the affinity's weight sets)


def score_candidates(
    model: RankingModel,
    inputs: RankingInputs,
    ranking: RankingConfig,
    out_path: Path,
    stage1_ads: StageOneAds | None = None,
) -> ScoringStats:
    """Write (user_id, ad_id, pctr, ecpm) for each user's top_n ads by ranking.objective to out_path (Parquet,
    renamed into place whole); ecpm is null under the pctr objective. stage1_ads: the ads' stage-1 terms
    when already computed (a shard's worker computes them once, tasks/shards.py)."""
    ads, users = inputs.ads, inputs.users
    # stage 1 ranks ecpm by log(pCTR) + log(bid), monotone in pCTR x bid
    log_bids = np.log(ads["bid"].to_numpy()).astype(np.float32) if ranking.objective == "ecpm" else None
    k = ranking.candidates_k
    stats = ScoringStats(users=users.height, ads=ads.height)
    stats.two_stage = is_two_stage(model, ads.height, k)
    if stats.two_stage and stage1_ads is None:
        stage1_ads = prepare_stage1(model, ads, stats)
    # the ads' match embeddings (or None), and the shown ads' (the affinity term): each ad encoded once a run
    ad_match = stage1_ads.ad_match if stage1_ads is not None else _ad_match(model, ads)
    shown = _shown_ads(model, inputs)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    progress = StageProgress("rerank: score users", users.height, "users", rate_unit="pairs")
    with pq.ParquetWriter(tmp, SCORES_SCHEMA) as writer, progress as bar:
        for start in range(0, users.height, ranking.user_chunk_size):
            chunk = users.slice(start, ranking.user_chunk_size)
            allowed = _candidate_mask(inputs, chunk)  # (chunk, ads) or None: every ad
            user_match = _user_match(model, chunk)
            similar = _similar(model, chunk, shown, ad_match)
            if stats.two_stage:
                rows, cols = _stage1(model, chunk, stage1_ads, allowed, k, stats, log_bids, user_match, similar)
            else:
                rows, cols = np.nonzero(allowed) if allowed is not None else _all_pairs(chunk.height, ads.height)
            pairs = _pairs(chunk, ads, rows, cols)
            if ad_match is not None:
                match = model.match_encoder.pair_scores(user_match, ad_match, rows, cols)
                pairs = pairs.with_columns(pl.Series(MATCH_COLUMN, match, dtype=pl.Float64))
            if similar is not None:
                pairs = pairs.with_columns(
                    pl.Series(name, grid[rows, cols], dtype=pl.Float64)
                    for name, grid in zip(SIMILAR_COLUMNS, similar, strict=True)
                )
            top = _stage2(model, pairs, ranking.top_n, stats, ranking.objective)
            writer.write_table(top.to_arrow().cast(SCORES_SCHEMA))
            stats.rows += top.height
            bar.advance(chunk.height, rated=pairs.height, cross_encoder_pairs=stats.stage2_pairs)
    tmp.replace(out_path)
    return stats


def is_two_stage(model: RankingModel, ads: int, k: int | None) -> bool:
    """Whether stage 1 narrows each user's ads to K (a two-tower, and fewer than all ads)."""
    return model.two_tower is not None and k is not None and k < ads


def prepare_stage1(model: RankingModel, ads: pl.DataFrame, stats: ScoringStats) -> StageOneAds:
    """Ad projections and exact per-ad terms: the cross-encoder's mean logit against the reference
    users (see tasks/two_tower.py) and the output layer's per-ad terms."""
    # per ad, for users with a history: every user rerank ranks was active in the days before
    tower, calibration = model.two_tower, model.calibration.for_users_with_history()
    ad_priors = PairPriors.of(ads)
    slope, offset, user_weights, match_weights = calibration.terms(ad_priors)
    tower_logits = slope / (tower.logit_scale or calibration.slope)  # older towers learned slope * logit
    started = time.perf_counter()
    embeddings = torch.from_numpy(_embed(model, ads["ad_text"]))
    references = tower.reference_user_texts
    with torch.inference_mode():
        projections = tower.ad(embeddings).numpy() * tower_logits[:, None]
        if references:
            reference = tower.user(torch.from_numpy(_embed(model, references))).numpy().mean(0)
        else:  # no anchor: the two-tower's own ad bias, users uncentred
            terms = tower.ad_bias(embeddings).squeeze(-1).numpy() * tower_logits
            reference = np.zeros(projections.shape[1], dtype=np.float32)
    stats.seconds["encode"] += time.perf_counter() - started

    started = time.perf_counter()
    if references:
        user_texts = np.repeat(np.asarray(references, dtype=object), ads.height)
        ad_texts = np.tile(ads["ad_text"].to_numpy(), len(references))
        logits = _logits(model, user_texts, ad_texts).reshape(len(references), ads.height)
        terms = slope * logits.mean(axis=0)
        stats.anchor_pairs += logits.size if calibration.uses_logit else 0
    stats.seconds["anchor"] += time.perf_counter() - started
    terms = (terms + offset).astype(np.float32)
    ad_match = _ad_match(model, ads)
    return StageOneAds(
        projections.astype(np.float32), terms, user_weights, reference, ad_match, match_weights, ad_priors.ad_counts
    )


def _stage1(
    model: RankingModel,
    chunk: pl.DataFrame,
    stage1_ads: StageOneAds,
    allowed: np.ndarray | None,
    k: int,
    stats: ScoringStats,
    log_bids: np.ndarray | None = None,
    user_match: UserMatch | None = None,
    similar: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's top k ads by the stage-1 score: (chunk row, ad row) index arrays."""
    started = time.perf_counter()
    projections = project_users(model, chunk)
    stats.seconds["encode"] += time.perf_counter() - started

    started = time.perf_counter()
    scores = stage1_scores(model, chunk, projections, stage1_ads, user_match)
    if similar is not None:  # exact, per user x ad
        scores += _affinity_grid(model.calibration.for_users_with_history(), chunk, stage1_ads, similar)
    if log_bids is not None:
        scores = -np.logaddexp(0.0, -scores) + log_bids  # log(sigmoid(log-odds) x bid)
    if allowed is not None:
        scores[~allowed] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # ties: the lower ad index first, deterministically
    rows = np.repeat(np.arange(chunk.height), top.shape[1])
    cols = top.reshape(-1)
    keep = np.isfinite(scores[rows, cols])  # fewer than k allowed candidates
    stats.stage1_pairs += scores.size
    stats.seconds["stage1"] += time.perf_counter() - started
    return rows[keep], cols[keep]


def project_users(model: RankingModel, users: pl.DataFrame) -> np.ndarray:
    """The two-tower's P(user) of each user text, shape (users, dim)."""
    with torch.inference_mode():
        return model.two_tower.user(torch.from_numpy(_embed(model, users["user_text"]))).numpy()


def stage1_scores(
    model: RankingModel,
    users: pl.DataFrame,
    projections: np.ndarray,
    stage1_ads: StageOneAds,
    user_match: UserMatch | None = None,
) -> np.ndarray:
    """Stage-1 log-odds of every user x ad, shape (users, ads): the output layer's terms, exact per ad, for the
    user prior and for the semantic match (user_match: the users' side of it), around the
    two-tower's estimate of the cross-encoder's logit (users: their P(user) and prior counts)."""
    scores = (projections - stage1_ads.reference) @ stage1_ads.projections.T + stage1_ads.terms
    if stage1_ads.ad_match is not None:  # exact, weighted per ad
        match = model.match_encoder.scores(user_match, stage1_ads.ad_match)
        scores += match.astype(np.float32) * stage1_ads.match_weights.astype(np.float32)
    user_prior = model.calibration.user_prior(PairPriors.of(users))
    return scores + np.outer(user_prior, stage1_ads.user_weights).astype(np.float32)  # differs for seen / unseen ads


def _uses_match(model: RankingModel) -> bool:
    """Whether the served layer reads the match encoder: for the match, or for the affinity term's kernel."""
    layer = model.calibration
    return model.match_encoder is not None and (layer.uses_match or layer.uses_affinity)


def _shown_ads(model: RankingModel, inputs: RankingInputs) -> ShownAds | None:
    """The shown ads' match embeddings when the served layer has the affinity term, else None."""
    if not (model.match_encoder is not None and model.calibration.uses_affinity):
        return None
    if inputs.shown_ads is None or not {"shown_ad_ids", "shown_clicked"} <= set(inputs.users.columns):
        raise ValueError(
            "the served model weighs the affinity term: the ranking inputs need the users' shown_ad_ids and "
            "shown_clicked and the shown ads' texts (its data.shown_history_length > 0)"
        )
    shown = inputs.shown_ads
    rows = {ad: row for row, ad in enumerate(shown["ad_id"].to_list())}
    return ShownAds(rows, model.match_encoder.embed(shown["ad_text"].to_list()))


def _similar(
    model: RankingModel, chunk: pl.DataFrame, shown: ShownAds | None, ad_vectors: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Similar impressions and clicks of every chunk user x ad, each (users, ads); None without the term."""
    if shown is None:
        return None
    lengths = chunk["shown_ad_ids"].list.len().fill_null(0).to_numpy()
    differ = chunk.filter(pl.Series(chunk["shown_clicked"].list.len().fill_null(0).to_numpy() != lengths))
    if differ.height:
        raise ValueError(f"shown_clicked must hold one flag per shown ad: users {differ['user_id'].head(10).to_list()}")
    ids, clicked = (chunk[c].filter(pl.Series(lengths > 0)).explode() for c in ("shown_ad_ids", "shown_clicked"))
    unknown = sorted({ad for ad in ids.to_list() if ad not in shown.rows}, key=str)
    if unknown or clicked.null_count():
        raise ValueError(f"the users' shown ads name ads without a text {unknown[:10]} or null flags")
    rows = np.array([shown.rows[ad] for ad in ids.to_list()], dtype=np.int64)
    clicked = clicked.cast(pl.Float64).to_numpy()
    return similar_grid(lengths, rows, clicked, shown.vectors, ad_vectors, model.calibration.affinity_bandwidth)


def _affinity_grid(
    calibration: Calibration, users: pl.DataFrame, stage1_ads: StageOneAds, similar: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """The affinity log-odds of every user x ad, (users, ads), float32: the layer on each pair's own counts."""
    n_users, n_ads = similar[0].shape
    user_counts = PairPriors.of(users).user_counts
    priors = PairPriors(
        n_users * n_ads,
        None if user_counts is None else tuple(np.repeat(c, n_ads) for c in user_counts),
        None if stage1_ads.ad_counts is None else tuple(np.tile(c, n_users) for c in stage1_ads.ad_counts),
        similar=(similar[1].reshape(-1), similar[0].reshape(-1)),
    )
    return calibration.affinity(priors).reshape(n_users, n_ads).astype(np.float32)


def _ad_match(model: RankingModel, ads: pl.DataFrame) -> np.ndarray | None:
    """The semantic match's unit embeddings of the ads' texts, or None when the served layer does not weigh it."""
    return model.match_encoder.embed(ads["ad_text"].to_list()) if _uses_match(model) else None


def _user_match(model: RankingModel, users: pl.DataFrame) -> UserMatch | None:
    """The users' side of the semantic match, or None when the served layer does not weigh it."""
    return model.match_encoder.users(users["user_text"].to_list()) if _uses_match(model) else None


def _embed(model: RankingModel, texts) -> np.ndarray:
    return embed_texts(model.cross_encoder, model.tokenizer, texts, model.max_length, model.batch_size)


def _logits(model: RankingModel, user_texts, ad_texts) -> np.ndarray:
    """Cross-encoder logits, at most STAGE2_BLOCK_PAIRS tokenised pairs held at once; zeros, without running
    it, when the output layer ignores the logit (fine-tuning kept step 0)."""
    if not model.calibration.uses_logit:
        return np.zeros(len(user_texts), dtype=np.float32)
    blocks = [
        predict_logits(
            model.cross_encoder,
            model.tokenizer,
            user_texts[i : i + STAGE2_BLOCK_PAIRS],
            ad_texts[i : i + STAGE2_BLOCK_PAIRS],
            model.max_length,
            model.batch_size,
        )
        for i in range(0, len(user_texts), STAGE2_BLOCK_PAIRS)
    ]
    return np.concatenate(blocks) if blocks else np.empty(0, dtype=np.float32)


def _stage2(
    model: RankingModel, pairs: pl.DataFrame, top_n: int, stats: ScoringStats, objective: str = "pctr"
) -> pl.DataFrame:
    """Cross-encoder pCTR (and eCPM) of each pair (identical text pairs scored once); each user's top_n."""
    started = time.perf_counter()
    texts = pairs.select("user_text", "ad_text").unique(maintain_order=True)
    logits = _logits(model, texts["user_text"].to_numpy(), texts["ad_text"].to_numpy())
    scored = pairs.join(texts.with_columns(pl.Series("logit", logits)), on=["user_text", "ad_text"], how="left")
    pctr = model.calibration.apply(scored["logit"].to_numpy(), PairPriors.of(scored))
    stats.stage2_pairs += pairs.height
    stats.stage2_unique_texts += texts.height if model.calibration.uses_logit else 0
    stats.seconds["stage2"] += time.perf_counter() - started
    scored = scored.with_columns(pl.Series("pctr", pctr, dtype=pl.Float64))
    ecpm = pl.col("pctr") * pl.col("bid") * IMPRESSIONS_PER_ECPM if objective == "ecpm" else pl.lit(None)
    # same order as sql/ad_rankings.sql, so the SQL ranks exactly these rows
    return (
        scored.with_columns(ecpm.cast(pl.Float64).alias("ecpm"))
        .sort(["user_id", objective, "ad_id"], descending=[False, True, False])
        .group_by("user_id", maintain_order=True)
        .head(top_n)
        .select("user_id", "ad_id", "pctr", "ecpm")
    )


def _candidate_mask(inputs: RankingInputs, chunk: pl.DataFrame) -> np.ndarray | None:
    if inputs.candidates is None:
        return None
    user_pos = {u: i for i, u in enumerate(chunk["user_id"].to_list())}
    ad_pos = {a: j for j, a in enumerate(inputs.ads["ad_id"].to_list())}
    mask = np.zeros((chunk.height, inputs.ads.height), dtype=bool)
    for user, ad in inputs.candidates.filter(pl.col("user_id").is_in(chunk["user_id"].implode())).iter_rows():
        if ad in ad_pos:
            mask[user_pos[user], ad_pos[ad]] = True
    return mask


def _all_pairs(n_users: int, n_ads: int) -> tuple[np.ndarray, np.ndarray]:
    return np.repeat(np.arange(n_users), n_ads), np.tile(np.arange(n_ads), n_users)


def _pairs(chunk: pl.DataFrame, ads: pl.DataFrame, rows: np.ndarray, cols: np.ndarray) -> pl.DataFrame:
    """(user_id, user_text[, user prior counts], ad_id, ad_text[, bid][, ad prior counts]) for the given
    chunk-row and ad-row indices."""
    user_columns = ["user_id", "user_text", *[c for c in USER_PRIOR_COLUMNS if c in chunk.columns]]
    ad_columns = ["ad_id", "ad_text", *[c for c in ("bid", *AD_PRIOR_COLUMNS) if c in ads.columns]]
    return pl.concat([chunk[rows].select(user_columns), ads[cols].select(ad_columns)], how="horizontal")
