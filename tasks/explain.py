"""Why this ad? The pCTR of one (user, ad) pair as rerank scores it, term by term, and with each title of the
user's history left out in turn (`adrank explain`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import numpy as np
import polars as pl

from tasks.config import Settings
from tasks.model import predict_logits
from tasks.output_layer import PairPriors
from tasks.pairs import history_ablations
from tasks.score import RankingModel
from tasks.semantic_match import with_served_match


@dataclass(frozen=True)
class Explanation:
    run_date: date
    user_text: str
    ad_text: str
    pctr: float
    # text, semantic_match, affinity, intercept, ad_prior, user_prior: they sum to logit(pctr)
    log_odds: dict[str, float]
    ad_cold: bool  # the ad was never shown before run_date: the cold-ad weights, no ad prior
    ad_counts: tuple[int, int]  # the ad's impressions and clicks before run_date
    new_user_weights: bool  # a new user (no impression before run_date) on a warm ad, with a layer that has them
    left_out: pl.DataFrame  # one row per history item: left_out_ad_id, left_out_text, pctr, pctr_change
    uses_logit: bool  # False: the version serves its output layer without the fine-tuned logit (kept step 0)


def explain_pair(settings: Settings, model: RankingModel, user_id: str, ad_id: str) -> Explanation:
    """Score the pair and its history ablations (tasks/pairs.py: history_ablations) with the ranking model."""
    run_date, rows = history_ablations(settings, user_id, ad_id)
    logits = predict_logits(
        model.cross_encoder, model.tokenizer, rows["user_text"], rows["ad_text"], model.max_length, model.batch_size
    )
    layer = model.calibration
    encoder = model.match_encoder if layer.uses_match or layer.uses_affinity else None
    priors = PairPriors.of(with_served_match(rows, encoder, layer.affinity_bandwidth if layer.uses_affinity else None))
    pctr = model.calibration.apply(logits, priors)
    first = rows.row(0, named=True)
    terms = model.calibration.contributions(logits[0], priors.take(np.arange(1)))
    left_out = rows.slice(1).select("left_out_ad_id", "left_out_text")
    left_out = left_out.with_columns(pl.Series("pctr", pctr[1:]), pl.Series("pctr_change", pctr[1:] - pctr[0])).sort(
        "pctr_change"
    )
    counts = (int(first["ad_prior_impressions"]), int(first["ad_prior_clicks"]))
    first_pair, layer = priors.take(np.arange(1)), model.calibration
    cold = bool(layer.is_cold(first_pair)[0])
    new_user = layer.weight_sets(first_pair)[0] == "new_user_"
    return Explanation(
        run_date,
        first["user_text"],
        first["ad_text"],
        float(pctr[0]),
        terms,
        cold,
        counts,
        new_user,
        left_out,
        layer.uses_logit,
    )


def to_text(explanation: Explanation, user_id: str, ad_id: str, version: str) -> str:
    """What `adrank explain` prints."""
    e, lines = explanation, []
    lines.append(f"user {user_id} x ad {ad_id}, run_date {e.run_date}, model version {version}")
    lines.append(f"  user text  {e.user_text}")
    lines.append(f"  ad text    {e.ad_text}")
    lines.append(f"  pCTR       {e.pctr:.4f}  (log-odds {sum(e.log_odds.values()):+.3f})")
    impressions, clicks = e.ad_counts
    seen = (
        "cold: never shown before, so the cold-ad weights and no ad prior"
        if e.ad_cold
        else f"shown {impressions} times before, clicked {clicks}"
    )
    weights = "; a new user (no impression before), so the new-user weights" if e.new_user_weights else ""
    lines.append(f"  output layer, log-odds by term (ad {seen}{weights}):")
    if not e.uses_logit:
        lines.append(
            "    (kept step 0: its fine-tuning never beat the untrained model, so the fine-tuned logit weighs 0)"
        )
    lines += [f"    {term:<14} {value:+.3f}" for term, value in e.log_odds.items()]
    if e.left_out.is_empty():
        lines.append("  history: none (nothing to leave out)")
    else:
        lines.append("  history, each title left out in turn (pCTR without it, change):")
        for row in e.left_out.iter_rows(named=True):
            lines.append(
                f"    {row['pctr']:.4f} {row['pctr_change']:+.4f}  {row['left_out_text']} ({row['left_out_ad_id']})"
            )
    return "\n".join(lines)
