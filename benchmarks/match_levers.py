"""Levers of the semantic match (its item share, how it is tuned) and the cold ads' weights, judged without
the test split.

    python benchmarks/match_levers.py   # ~45 min on 2 cores; writes docs/benchmarks/match-levers-sample.json
    python benchmarks/match_levers.py --data ../shared/datasets/ml-100k --sections cold_fit \
        --out docs/benchmarks/match-levers-ml100k.json   # ~2 min: one section, on MovieLens-100K

On the embedded sample market (adrank sample-data's defaults; or --data MovieLens-100K, --logs any data set in
the log contract), pairs built as retrain builds them; --sections picks which of these run (default: all):
- model.match_item_share: the output layer without a logit (step 0: the priors and the zero-shot match), fitted
  on validation as retrain fits it, scored out of sample on the training split's pairs of ranked users (more days
  and users than validation holds), gAUC and AUC against the whole text alone (share 0), with paired bootstrap
  intervals over users.
- Where cold ads' weights are fitted when validation's cold pairs hold too few clicks: the pairs of the
  least-shown ads or every validation pair without the ad prior, scored on the training split's pairs of cold
  ads past its first day (calibration ratio, equal-mass ECE, AUC), and which of the two retrain chose on those
  same pairs (tasks/output_layer.py cold_fit_rows: by the priors alone).
- How the match's encoder is tuned on the training split's clicks (tasks/train.py tune_match): on the whole
  text's cosine with in-batch negatives (the objective before the match as served was trained), on the match as
  served with in-batch negatives, and as served with the ads each user passed over (the default). Each is judged
  as the match's guard judges it: step 0 (the priors and the match) cross-fitted on validation with the tuned
  encoder minus the zero-shot one, paired user-bootstrap intervals, and the guard's verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.docs_blocks import DOC, command_line, hardware, write_block  # noqa: E402
from benchmarks.protocol import lever_pairs  # noqa: E402
from tasks.intervals import Interval, Scored, paired_interval  # noqa: E402
from tasks.metrics import (  # noqa: E402
    calibration_ratio,
    expected_calibration_error_equal_mass,
    metrics,
    ranking_lists,
    roc_auc,
)
from tasks.output_layer import MATCH_COLUMN, PairPriors, least_shown_rows, logistic_fit  # noqa: E402
from tasks.registry import git_commit  # noqa: E402
from tasks.semantic_match import MatchEncoder, load_match_encoder, tune_match_encoder, with_match  # noqa: E402
from tasks.train import (  # noqa: E402
    calibrate,
    cold_ad_pairs,
    match_clicks,
    match_tuning,
    match_verdict,
    prior_template,
    served_gain,
)

REPO = Path(__file__).resolve().parents[1]
ITEM_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
REPLICATES = 1000
EMBED_BATCH = 64
SECTIONS = ("item_share", "cold_fit", "tuning")
# how the match is tuned: (the item share the tuning trains, None: the served one; ads passed over per click,
# None: training.match_passed_over)
TUNING_VARIANTS = {
    "whole_text_in_batch": (0.0, 0),
    "as_served_in_batch": (None, 0),
    "as_served_passed_over": (None, None),
}


def with_shared_match(encoder: MatchEncoder, frames: dict[str, pl.DataFrame]) -> dict[float, dict[str, pl.DataFrame]]:
    """Each frame with the match at each of ITEM_SHARES: every text embedded once, then blended per share."""
    out: dict[float, dict[str, pl.DataFrame]] = {share: {} for share in ITEM_SHARES}
    blended = replace(encoder, item_share=1.0)  # embeds the items too
    for name, frame in frames.items():
        users, user_rows = np.unique(frame["user_text"].to_numpy().astype(str), return_inverse=True)
        ads, ad_rows = np.unique(frame["ad_text"].to_numpy().astype(str), return_inverse=True)
        side, ad_vectors = blended.users(users.tolist()), blended.embed(ads.tolist())
        for share in ITEM_SHARES:
            match = replace(encoder, item_share=share).pair_scores(side, ad_vectors, user_rows, ad_rows)
            out[share][name] = frame.with_columns(pl.Series(MATCH_COLUMN, match, dtype=pl.Float64))
    return out


def item_share_levers(settings, train: pl.DataFrame, shared: dict[float, dict[str, pl.DataFrame]]) -> dict:
    """Per share: step 0's layer fitted on validation, scored on train's pairs of ranked users."""
    labels = shared[0.0]["scored"]["is_clicked"].cast(pl.Int8).to_numpy()
    pctr = {}
    for share, frames in shared.items():
        layer = calibrate(settings, train, frames["valid"], None)
        pctr[str(share)] = layer.apply(np.zeros(len(labels)), PairPriors.of(frames["scored"]))
    scored = shared[0.0]["scored"]
    groups = ranking_lists(scored["user_id"], scored["shown_at"])
    sets = [Scored(scored["user_id"].to_numpy(), labels, pctr, groups)]
    rows = {}
    for share in pctr:
        m = metrics(labels, pctr[share], groups)
        rows[share] = {"gauc": m["gauc"], "auc": m["auc"]} | {
            f"{metric}_minus_whole_text": paired_interval(sets, share, "0.0", metric, REPLICATES).as_dict()
            for metric in ("gauc", "auc")
        }
    return {"scored_pairs": scored.height, "scored_users": scored["user_id"].n_unique(), "shares": rows}


def cold_fit_levers(settings, train: pl.DataFrame, frames: dict[str, pl.DataFrame]) -> dict:
    """The default layer's warm weights with cold weights fitted by each rule, on train's cold-ad pairs."""
    valid, cold = frames["valid"], frames["cold"]
    layer = calibrate(settings, train, valid, None)
    labels, priors = valid["is_clicked"].cast(pl.Int8).to_numpy(), PairPriors.of(valid)
    template = prior_template(settings, train)
    user, match = template.user_prior(priors), template.match(priors)
    min_clicks, impressions = settings.model.cold_fit_min_clicks, priors.ad_counts[1]
    rules = {
        "least_shown_ads": least_shown_rows(impressions, labels, min_clicks),
        "every_pair": np.ones(len(labels), bool),
    }
    cold_labels = cold["is_clicked"].cast(pl.Int8).to_numpy()
    out = {"valid_cold_pairs": int((impressions <= 0).sum()), "scored_cold_pairs": cold.height}
    out["valid_cold_clicks"] = int(labels[impressions <= 0].sum())
    out |= {"min_clicks": min_clicks, "chosen": layer.cold_fit}  # what retrain's layer was fitted on (the rule)
    out["scored_cold_click_rate"] = float(cold_labels.mean())
    for rule, rows in rules.items():
        if rows is None:  # validation holds fewer than min_clicks clicks in all
            out[rule] = None
            continue
        weights = logistic_fit(labels[rows], user=user[rows], match=match[rows])
        fitted = replace(layer, **{f"unseen_{name}": value for name, value in weights.items()})
        pctr = fitted.apply(np.zeros(cold.height), PairPriors.of(cold))
        out[rule] = {
            "fit_pairs": int(rows.sum()),
            "calibration_ratio": calibration_ratio(cold_labels, pctr),
            "ece_equal_mass": expected_calibration_error_equal_mass(cold_labels, pctr),
            "auc": roc_auc(cold_labels, pctr),
        }
    return out


def tuning_levers(settings, encoder: MatchEncoder, train: pl.DataFrame, valid: pl.DataFrame) -> dict:
    """Each TUNING_VARIANTS tuning from the zero-shot encoder on train's clicks, served at the default share."""
    zero_shot = {name: weights.clone() for name, weights in encoder.model.state_dict().items()}
    zero_shot_valid = with_match(valid, encoder)
    out = {"clicks": int(train["is_clicked"].cast(pl.Int8).sum()), "variants": {}}
    for name, (tuned_share, passed_over) in TUNING_VARIANTS.items():
        encoder.model.load_state_dict(zero_shot)
        tuner = encoder if tuned_share is None else replace(encoder, item_share=tuned_share)  # the same model
        passed_over = settings.training.match_passed_over if passed_over is None else passed_over
        clicks = match_clicks(train, passed_over, settings.training.seed)
        started = time.perf_counter()
        losses = tune_match_encoder(tuner, clicks, match_tuning(settings))
        seconds = time.perf_counter() - started
        gain = served_gain(settings, train, (with_match(valid, encoder), None), (zero_shot_valid, None))
        out["variants"][name] = {
            "trained_item_share": tuner.item_share,
            "passed_over": passed_over,
            "steps": len(losses),
            "seconds": seconds,
            "minus_zero_shot": {metric: interval.as_dict() for metric, interval in gain.items()},
            "guard": match_verdict(gain)[1],
        }
        print(name, out["variants"][name], flush=True)
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, help="MovieLens-100K folder (converted to the log contract)")
    source.add_argument("--logs", type=Path, help="a data set already in adrank's log contract")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure")
    parser.add_argument("--work", type=Path, default=Path("adrank_home/match-levers"), help="scratch folder")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "docs/benchmarks/match-levers-sample.json",
        help="the JSON; written into docs/benchmarks/, it also writes the block of its name in docs/benchmarks.md",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    work = args.work.resolve()
    settings, train, valid = lever_pairs(args.data, args.logs, work)
    model = settings.model
    encoder = load_match_encoder(model.base_model, torch.device("cpu"), model.max_seq_length, EMBED_BATCH)
    frames = {"valid": valid}  # each frame's texts are embedded: only what the sections score
    if "item_share" in args.sections:
        frames["scored"] = train.filter(pl.col("is_ranked_user"))
    if "cold_fit" in args.sections:
        frames["cold"] = cold_ad_pairs(train)  # the pairs retrain chooses the rule on
    shared = with_shared_match(encoder, frames)
    default = model.match_item_share
    result = {
        "command": command_line(),
        "hardware": hardware(),
        "commit": git_commit(),
        "logs": str(settings.data.logs),
        "default_item_share": default,
    }
    if "item_share" in args.sections:
        result["item_share"] = item_share_levers(settings, train, shared)
    if "cold_fit" in args.sections:
        result["cold_fit"] = cold_fit_levers(settings, train, shared[default])
    if "tuning" in args.sections:
        result["tuning"] = tuning_levers(settings, replace(encoder, item_share=default), train, valid)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.out.resolve().parent == (REPO / "docs/benchmarks").resolve():
        write_block(DOC, args.out.stem, markdown(result), "The semantic match's levers")
    print(markdown(result))


def markdown(result: dict) -> str:
    """The block docs/benchmarks.md holds, per section measured: one row per item share, the cold-fit rules, the
    tunings."""
    run = f"`{result['command']}` at `{result['commit']}` ({result['hardware']})."
    lines = (share_lines(run, result) if "item_share" in result else [run]) + cold_fit_lines(result)
    return "\n".join(lines + tuning_lines(result)) + "\n"


def share_lines(run: str, result: dict) -> list[str]:
    shares = result["item_share"]
    lines = [
        f"{run} Step 0's output layer (the priors "
        f"and the zero-shot match) fitted on validation, scored on the training split's {shares['scored_pairs']:,} "
        f"pairs of {shares['scored_users']:,} ranked users; intervals: paired bootstrap over users, 95%.",
        "",
        "| model.match_item_share | gAUC | AUC | gAUC − whole text | AUC − whole text |",
        "|---|---|---|---|---|",
    ]
    for share, row in shares["shares"].items():
        gauc, auc = (row[f"{metric}_minus_whole_text"] for metric in ("gauc", "auc"))
        gauc, auc = (Interval(d["mean"], *d["interval"]) for d in (gauc, auc))
        default = " (default)" if float(share) == result["default_item_share"] else ""
        lines.append(f"| {share}{default} | {row['gauc']:.4f} | {row['auc']:.4f} | {gauc} | {auc} |")
    return lines


def cold_fit_lines(result: dict) -> list[str]:
    if "cold_fit" not in result:
        return []
    cold = result["cold_fit"]
    # JSONs written before retrain chose the rule (46570b1; match-levers-sample.json, at fefe07f) hold neither the
    # threshold nor the choice
    min_clicks = cold.get("min_clicks", 100)
    enough = cold["valid_cold_clicks"] >= min_clicks
    scored = "pairs of cold ads past its first day" if "chosen" in cold else "pairs of cold ads"
    lines = [
        "",
        f"Cold ads' weights when validation's {cold['valid_cold_pairs']} cold pairs hold {cold['valid_cold_clicks']} "
        f"clicks ({'enough: retrain fits on them' if enough else 'too few'}; model.cold_fit_min_clicks "
        f"{min_clicks}), scored on the training split's {cold['scored_cold_pairs']:,} {scored} "
        f"(click rate {cold['scored_cold_click_rate']:.3f}):",
        "",
        "| fitted on | pairs | calibration ratio | ECE (equal mass) | AUC |",
        "|---|---|---|---|---|",
    ]
    for rule, name in (("least_shown_ads", "the least-shown ads"), ("every_pair", "every pair")):
        row = cold[rule]
        if row is None:
            lines.append(f"| {name} | (fewer than {min_clicks} clicks in all) | | | |")
            continue
        lines.append(
            f"| {name} | {row['fit_pairs']:,} | {row['calibration_ratio']:.3f} | {row['ece_equal_mass']:.4f} "
            f"| {row['auc']:.4f} |"
        )
    chosen = [] if "chosen" not in cold else ["", f"Retrain's layer fitted its cold weights on {cold['chosen']}."]
    return lines + chosen


def tuning_lines(result: dict) -> list[str]:
    if "tuning" not in result:
        return []
    tuning = result["tuning"]
    lines = [
        "",
        f"The match's encoder tuned one epoch on the training split's {tuning['clicks']:,} clicks, served at the "
        "default share: step 0 (the priors and the match) cross-fitted on validation, tuned minus zero-shot, as "
        "the match's guard judges it:",
        "",
        "| tuned on | ads passed over per click | steps | minutes | logloss | AUC | gAUC | guard |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "whole_text_in_batch": "the whole text's cosine (before)",
        "as_served_in_batch": "the match as served",
        "as_served_passed_over": "the match as served (default)",
    }
    for name, row in tuning["variants"].items():
        gain = {m: Interval(d["mean"], *d["interval"]) for m, d in row["minus_zero_shot"].items()}
        lines.append(
            f"| {names[name]} | {row['passed_over']} | {row['steps']} | {row['seconds'] / 60:.1f} "
            f"| {gain['logloss']} | {gain['auc']} | {gain['gauc']} | {row['guard']} |"
        )
    return lines


if __name__ == "__main__":
    main()
