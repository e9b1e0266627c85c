"""The quality benchmark's protocol: the logs it reads, cold items held out of them, the time split, paired
intervals.

Kept apart from benchmarks/quality.py (which trains and reports) so that each rule is tested on its own.
"""

from __future__ import annotations

import hashlib
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.movielens import checksum, convert_movielens
from tasks.config import SampleDataConfig, load_settings
from tasks.evaluate import slice_masks
from tasks.intervals import HIGHER_IS_BETTER, Interval, Scored, paired_interval
from tasks.metrics import ranking_lists
from tasks.pairs import build_pairs
from tasks.sample_data import generate_sample_logs

COLD_ITEM_SHARE = 0.10


def source_logs(data: Path | None, logs: Path | None, work: Path, name: str) -> tuple[Path, str]:
    """The log folder a benchmark reads and its data's checksum: logs as given, data (MovieLens-100K) converted
    into work/<name>-logs, else the embedded sample market generated there."""
    if logs:
        return logs.resolve(), "n/a (--logs)"
    if data:
        convert_movielens(data, work / f"{name}-logs")
        return work / f"{name}-logs", checksum(data)
    market = SampleDataConfig()
    generate_sample_logs(market, work / f"{name}-logs")  # replaces only a folder it wrote (tasks/folders.py)
    return work / f"{name}-logs", hashlib.sha256(market.model_dump_json().encode()).hexdigest()  # seeded


def lever_pairs(data: Path | None, logs: Path | None, work: Path) -> tuple:
    """What a lever benchmark reads: adrank's default settings over source_logs' logs (home: work/home) and the
    train and validation pairs retrain builds from them."""
    source, _ = source_logs(data, logs, work, "ml100k" if data else "sample")
    settings = load_settings({"home": str(work / "home"), "data": {"logs": str(source)}})
    build_pairs(settings)
    train, valid = (pl.read_parquet(settings.pairs_dir / f"{split}.parquet") for split in ("train", "valid"))
    return settings, train, valid


def hold_out_items(logs: Path, out: Path, seed: int, test_from: datetime) -> list[str]:
    """Copy the logs to out without any impression of a seeded COLD_ITEM_SHARE of the ads before test_from.

    Pairs built from out never see a held-out ad in training or validation: not as a pair, not in a
    user's history text, not in a prior count. Their test impressions stay: on the first day each is shown
    they are cold (the cold_start slice), and every one of them is new to the model (new_ads).
    """
    impressions = pl.read_parquet(logs / "impressions")
    items = np.sort(impressions["ad_id"].cast(pl.String).unique().to_numpy())
    cold = np.random.default_rng(seed).choice(items, size=max(1, round(COLD_ITEM_SHARE * len(items))), replace=False)
    cold = sorted(cold.tolist())
    shown_at = pl.col("ts")
    if getattr(impressions.schema["ts"], "time_zone", None):  # as adrank stages ts: naive UTC, like test_from
        shown_at = shown_at.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    held_out = pl.col("ad_id").cast(pl.String).is_in(cold) & (shown_at < test_from)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(logs, out, ignore=shutil.ignore_patterns("impressions"))
    (out / "impressions").mkdir()
    impressions.filter(~held_out).write_parquet(out / "impressions" / "part-0.parquet")
    return cold


def time_split_pairs(settings, valid_from: datetime, test_from: datetime) -> dict[str, pl.DataFrame]:
    """adrank's pairs of settings.data.logs, split at the cutoffs of the full logs (so every seed has the same
    test impressions), with is_new_ad = the ad has no training pair (adrank's rule, at these cutoffs: first
    shown at or after valid_from; the held-out ads among them); is_cold_start and is_ranked_user as
    build_pairs sets them (point-in-time)."""
    built = build_pairs(settings)
    pairs = pl.concat([pl.read_parquet(path) for path in built.paths.values()]).with_columns(
        pl.when(pl.col("shown_at") >= test_from)
        .then(pl.lit("test"))
        .when(pl.col("shown_at") >= valid_from)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
        .alias("split")
    )
    seen = pairs.filter(pl.col("split") == "train")["ad_id"].unique().implode()
    pairs = pairs.with_columns((~pl.col("ad_id").is_in(seen)).alias("is_new_ad"))
    return {name: pairs.filter(pl.col("split") == name).sort("shown_at", "impression_id") for name in built.paths}


def best_peer(means: dict[str, dict[str, dict[str, float]]], peers: list[str], metric: str, slice_name: str) -> str:
    """The peer with the best mean value of metric on slice_name."""

    def goodness(peer: str) -> float:
        value = means[peer][slice_name][metric]
        if metric == "calibration_ratio":
            return -abs(value - 1)
        return value if metric in HIGHER_IS_BETTER else -value

    return max(peers, key=goodness)


def paired_bootstrap(
    runs: list[dict], model: str, peer: str, slice_name: str, metric: str, replicates: int, seed: int
) -> Interval:
    """(model - peer) on metric over the runs (seeds) and its 95% interval, resampling test users (the same
    draw for every run: the test users are the same; tasks/intervals.py).

    Each run: {"test": the test pairs (user_id, is_clicked and the slice columns of tasks/evaluate.py),
    "predictions": {model: pCTR}}.
    """
    sets = []
    for run in runs:
        test = run["test"]
        scored = Scored(
            test["user_id"].cast(pl.String).to_numpy(),
            test["is_clicked"].cast(pl.Int8).to_numpy(),
            {name: np.asarray(run["predictions"][name]) for name in (model, peer)},
            ranking_lists(test["user_id"], test["shown_at"]),
        )
        sets.append(scored.take(slice_masks(test)[slice_name]))
    return paired_interval(sets, model, peer, metric, replicates, seed)
