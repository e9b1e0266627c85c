"""The lever behind adrank's affinity term (tasks/affinity.py), as measured before it was built, judged without
the test split: the user's past response to similar ads.

    python benchmarks/affinity_lever.py --out docs/benchmarks/affinity-lever-sample.json   # the sample market
    python benchmarks/affinity_lever.py --data ../shared/datasets/ml-100k \
        --out docs/benchmarks/affinity-lever-ml100k.json

adrank's texts carry a user's clicks (history) but not the ads they were shown and passed over, and its priors
count a user's clicks on every ad alike. This term is the user's click rate on the ads they were shown before,
each past impression weighted by how similar its ad is to the scored ad: exp((cosine - 1) / bandwidth) of the
zero-shot encoder's ad embeddings (the semantic match's, whole text), or the same ad only (an ID feature, no
text). Counted as the pairs' features are (data.features_as_of: strictly before the pair's day start), shrunk
towards the user's own rate (rate = (similar clicks + the user's rate) / (similar impressions + 1)); terms
log-odds(rate) - log-odds(user's rate) and log(1 + similar impressions), and their product.

Step 0's output layer (the priors and the zero-shot match, tasks/train.py calibrate) is fitted on validation; a
logistic regression of its log-odds and the terms is fitted on validation too; each against step 0 alone (paired
bootstrap over users, 95%), scored two ways:
- on the training split's pairs of ranked users: more users and days than validation, where neither regression is
  fitted (the zero-shot encoder was trained on none of them; the training split's click rate and its cold pairs
  shape the priors, for step 0 and every variant alike); but its early days know a short past;
- on validation, cross-fitted as retrain's selection is (tasks/train.py cross_fitted_pctr's folds of users, each
  scored by step 0's layer and the regression both fitted on the others): the days rerank serves next, fewer pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.docs_blocks import DOC, command_line, hardware, write_block  # noqa: E402
from benchmarks.protocol import lever_pairs  # noqa: E402
from tasks.intervals import Interval, Scored, paired_interval  # noqa: E402
from tasks.logs import open_logs  # noqa: E402
from tasks.metrics import metrics, ranking_lists  # noqa: E402
from tasks.output_layer import PairPriors, probability_log_odds  # noqa: E402
from tasks.registry import git_commit  # noqa: E402
from tasks.semantic_match import load_match_encoder, with_match  # noqa: E402
from tasks.train import CROSS_FIT_FOLDS, calibrate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BANDWIDTHS = (0.05, 0.1, 0.2)
USER_RATE_STRENGTH = 10.0  # impressions' worth of the training click rate in a user's own rate
SIMILAR_RATE_STRENGTH = 1.0  # impressions' worth of the user's own rate in the similar ads' rate
SECOND_STAGE_C = 10.0  # inverse L2 strength of the second stage's logistic regression (4 weights, thousands of pairs)
REPLICATES = 1000
EMBED_BATCH = 64
METRICS = ("gauc", "auc", "logloss")


def past_impressions(settings) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """Every impression, by user and time: {user: (first row, end row)}, shown_at, ad_id, is_clicked (rows)."""
    staged = open_logs(settings.data.logs, settings.data)
    impressions = staged.table("stg_impressions").pl().sort("user_id", "shown_at")
    users = impressions["user_id"].to_numpy()
    unique, first = np.unique(users, return_index=True)
    bounds = dict(zip(unique.tolist(), zip(first, np.r_[first[1:], len(users)], strict=True), strict=True))
    clicked = impressions["is_clicked"].cast(pl.Int8).to_numpy()
    return bounds, impressions["shown_at"].to_numpy(), impressions["ad_id"].to_numpy().astype(str), clicked


def similar_counts(frame: pl.DataFrame, past, kernel: np.ndarray, ad_rows: dict, as_of: str) -> np.ndarray:
    """Per pair: impressions, clicks, similar impressions, similar clicks of its user before its moment
    (columns of a (pairs, 4) array); kernel: ad rows x ad rows weights."""
    bounds, shown_at, ad_ids, clicked = past
    moments = frame["shown_at"].dt.truncate("1d") if as_of == "day_start" else frame["shown_at"]
    past_rows = np.array([ad_rows[a] for a in ad_ids])  # every impression is a pair: its ad has a row
    out = np.zeros((frame.height, 4))
    for row, (user, ad, moment) in enumerate(zip(frame["user_id"], frame["ad_id"], moments.to_numpy(), strict=True)):
        start, end = bounds[user]  # a pair's user has an impression: the pair's own
        end = start + np.searchsorted(shown_at[start:end], moment)  # strictly before the moment
        weights = kernel[ad_rows[ad], past_rows[start:end]]
        out[row] = end - start, clicked[start:end].sum(), weights.sum(), weights @ clicked[start:end]
    return out


def affinity_terms(counts: np.ndarray, base_rate: float) -> np.ndarray:
    """The terms from similar_counts: the similar ads' shrunk rate over the user's, its weight, their product."""
    shown, clicks, similar_shown, similar_clicks = counts.T
    user_rate = (clicks + USER_RATE_STRENGTH * base_rate) / (shown + USER_RATE_STRENGTH)
    rate = (similar_clicks + SIMILAR_RATE_STRENGTH * user_rate) / (similar_shown + SIMILAR_RATE_STRENGTH)
    lift, weight = probability_log_odds(rate) - probability_log_odds(user_rate), np.log1p(similar_shown)
    return np.column_stack([lift, weight, lift * weight])


def second_stage(fit: tuple[np.ndarray, np.ndarray, np.ndarray], score: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """pCTR of the score pairs by a logistic regression of step 0's log-odds and the terms, fitted on the fit pairs
    ((step 0's pCTR, terms, labels); score: (step 0's pCTR, terms))."""
    step0, terms, labels = fit
    model = LogisticRegression(C=SECOND_STAGE_C, max_iter=1000)
    model.fit(np.column_stack([probability_log_odds(step0), terms]), labels)
    return model.predict_proba(np.column_stack([probability_log_odds(score[0]), score[1]]))[:, 1]


def cross_fitted(settings, train: pl.DataFrame, valid: pl.DataFrame, terms: dict) -> dict[str, np.ndarray]:
    """Step 0 and each variant on validation out of sample: users in CROSS_FIT_FOLDS folds (as tasks/train.py
    cross_fitted_pctr's), each fold scored by step 0's layer and the second stage both fitted on the others."""
    folds = (valid["user_id"].hash(seed=0) % CROSS_FIT_FOLDS).to_numpy()
    labels = valid["is_clicked"].cast(pl.Int8).to_numpy()
    out = {name: np.empty(valid.height) for name in ("step_0", *terms)}
    for fold in range(CROSS_FIT_FOLDS):
        rows = {"fit": folds != fold, "score": folds == fold}
        layer = calibrate(settings, train, valid.filter(rows["fit"]), None)
        step0 = {k: layer.apply(np.zeros(int(r.sum())), PairPriors.of(valid.filter(r))) for k, r in rows.items()}
        out["step_0"][rows["score"]] = step0["score"]
        for name, by_split in terms.items():
            fit = (step0["fit"], by_split["valid"][rows["fit"]], labels[rows["fit"]])
            out[name][rows["score"]] = second_stage(fit, (step0["score"], by_split["valid"][rows["score"]]))
    return out


def gains(frame: pl.DataFrame, labels: np.ndarray, pctr: dict[str, np.ndarray]) -> dict:
    """Per variant: METRICS, and each minus step 0's with its interval."""
    groups = ranking_lists(frame["user_id"], frame["shown_at"])
    sets = [Scored(frame["user_id"].to_numpy(), labels, pctr, groups)]
    variants = {}
    for name, p in pctr.items():
        measured = metrics(labels, p, groups)
        variants[name] = {metric: measured[metric] for metric in METRICS}
        if name != "step_0":
            variants[name] |= {
                f"{metric}_minus_step_0": paired_interval(sets, name, "step_0", metric, REPLICATES).as_dict()
                for metric in METRICS
            }
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, help="MovieLens-100K folder (converted to the log contract)")
    source.add_argument("--logs", type=Path, help="a data set already in adrank's log contract")
    parser.add_argument("--work", type=Path, default=Path("adrank_home/affinity-lever"), help="scratch folder")
    parser.add_argument("--out", type=Path, required=True, help="the JSON; in docs/benchmarks/ it writes its block")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    work = args.work.resolve()
    settings, train, valid = lever_pairs(args.data, args.logs, work)
    model = settings.model
    encoder = load_match_encoder(
        model.base_model, torch.device("cpu"), model.max_seq_length, EMBED_BATCH, model.match_item_share
    )
    frames = {
        "valid": with_match(valid, encoder),
        "scored": with_match(train.filter(pl.col("is_ranked_user")), encoder),
    }
    ads = (  # every ad shown, the test split's too (never a past impression here, but every impression has a row)
        pl.concat([train, valid, pl.read_parquet(settings.pairs_dir / "test.parquet")])
        .select("ad_id", "ad_text")
        .unique("ad_id", keep="last")
        .sort("ad_id")
    )
    ad_rows = {ad: row for row, ad in enumerate(ads["ad_id"])}
    vectors = encoder.embed(ads["ad_text"].to_list())
    kernels = {"same_ad": np.eye(len(ad_rows))} | {
        f"text_bandwidth_{h}": np.exp((vectors @ vectors.T - 1) / h) for h in BANDWIDTHS
    }
    layer = calibrate(settings, train, frames["valid"], None)
    step0 = {name: layer.apply(np.zeros(f.height), PairPriors.of(f)) for name, f in frames.items()}
    labels = {name: f["is_clicked"].cast(pl.Int8).to_numpy() for name, f in frames.items()}
    past, base_rate = past_impressions(settings), float(train["is_clicked"].cast(pl.Int8).mean())
    terms = {
        name: {
            split: affinity_terms(similar_counts(f, past, kernel, ad_rows, settings.data.features_as_of), base_rate)
            for split, f in frames.items()
        }
        for name, kernel in kernels.items()
    }
    pctr = {"scored": {"step_0": step0["scored"]}, "valid": cross_fitted(settings, train, frames["valid"], terms)}
    for name in kernels:
        fit = (step0["valid"], terms[name]["valid"], labels["valid"])
        pctr["scored"][name] = second_stage(fit, (step0["scored"], terms[name]["scored"]))
    scored = {split: gains(frames[split], labels[split], pctr[split]) for split in ("scored", "valid")}
    result = {
        "command": command_line(),
        "hardware": hardware(),
        "commit": git_commit(),
        "logs": str(settings.data.logs),
        "features_as_of": settings.data.features_as_of,
        "valid_pairs": valid.height,
        "valid_clicks": int(labels["valid"].sum()),
        "scored_pairs": frames["scored"].height,
        "scored_users": frames["scored"]["user_id"].n_unique(),
        "ads": len(ad_rows),
        "variants": scored["scored"],
        "variants_cross_fitted_on_validation": scored["valid"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.out.resolve().parent == (REPO / "docs/benchmarks").resolve():
        write_block(DOC, args.out.stem, markdown(result), "A user's past response to similar ads (a lever)")
    print(markdown(result))


def markdown(result: dict) -> str:
    """Per way of scoring, one row per variant: its score and its gain over step 0 alone."""
    lines = [
        f"`{result['command']}` at `{result['commit']}` ({result['hardware']}, {result['seconds']:.0f} s); "
        f"{result['ads']:,} ads; validation: {result['valid_pairs']:,} pairs, {result['valid_clicks']:,} clicks.",
    ]
    for key, title in (
        (
            "variants",
            f"Fitted on validation, scored on the training split's {result['scored_pairs']:,} pairs of "
            f"{result['scored_users']:,} ranked users:",
        ),
        ("variants_cross_fitted_on_validation", "Cross-fitted on validation (folds of users):"),
    ):
        lines += [
            "",
            title,
            "",
            "| variant | gAUC | AUC | logloss | gAUC − step 0 | AUC − step 0 | logloss − step 0 |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in result[key].items():
            cells = [f"{row[metric]:.4f}" for metric in METRICS] + [
                str(Interval(row[k]["mean"], *row[k]["interval"])) if k in row else "—"
                for k in (f"{metric}_minus_step_0" for metric in METRICS)
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
