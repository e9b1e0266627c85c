"""Sharded scoring: rerank's users split into shards of whole user chunks, each scored by its own task.

The shard tasks run on the task runner that ranking.task_runner names: threads of the flow's process
('local'), or a Dask cluster ('dask': ranking.dask_address, or a LocalCluster of ranking.dask_workers
processes started for the run). A worker process loads the model once and computes the ads' stage-1
terms once a night (the caches below, keyed by what determines them), however many shards it scores.
Each shard writes its top-N rows to staging/ad_rankings-<date>/shard-<i>.parquet, renamed into place
whole, so a retried or rescheduled shard overwrites its own file; rerank publishes the folder once every
shard has succeeded. A shard holds whole user chunks, so each user is scored in the same chunk as in the
in-process path (tasks/score.py) and the rows are the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import threading
import uuid
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl

from tasks import registry
from tasks.config import RankingConfig, Settings
from tasks.output_layer import AD_PRIOR_COLUMNS
from tasks.pairs import RankingInputs
from tasks.score import RankingModel, ScoringStats, StageOneAds, is_two_stage, prepare_stage1, score_candidates

# per worker process: one model (a new champion replaces it) and one night's stage-1 ad terms
_MODELS: dict[tuple, RankingModel] = {}
_STAGE1: dict[tuple, StageOneAds] = {}
_CACHE_LOCK = threading.Lock()  # the 'local' runner's shards are threads of one process


def shard_dir(staging_dir: Path, run_date: date) -> Path:
    return staging_dir / f"ad_rankings-{run_date.isoformat()}"


def split_users(inputs: RankingInputs, shards: int, chunk_size: int) -> list[RankingInputs]:
    """At most `shards` consecutive slices of the users, each a whole number of user chunks (no empty
    shard), with the candidates of their users."""
    chunks = max(1, math.ceil(inputs.users.height / chunk_size))
    per_shard = math.ceil(chunks / min(shards, chunks)) * chunk_size
    pieces = []
    for start in range(0, max(inputs.users.height, 1), per_shard):
        users = inputs.users.slice(start, per_shard)
        candidates = inputs.candidates
        if candidates is not None:
            candidates = candidates.filter(pl.col("user_id").is_in(users["user_id"].implode()))
        pieces.append(replace(inputs, users=users, candidates=candidates))
    return pieces


def prepare_shard_dir(staging_dir: Path, run_date: date) -> Path:
    """An empty shard folder for run_date: files of an earlier run (other shard counts) never get published."""
    folder = shard_dir(staging_dir, run_date)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def score_shard(settings: Settings, version: str, inputs: RankingInputs, out_path: Path) -> ScoringStats:
    """Score one shard's users with the worker's cached model into out_path (Parquet, renamed into place
    whole: a retried shard, or a copy of it that Dask started elsewhere, leaves one whole file)."""
    model = cached_model(settings, version)
    stats = ScoringStats()
    stage1_ads = None
    if is_two_stage(model, inputs.ads.height, settings.ranking.candidates_k):
        stage1_ads = cached_stage1(model, (settings.tracking.mlflow_uri, version), inputs, stats)
    attempt = out_path.with_name(f".{out_path.stem}-{uuid.uuid4().hex[:8]}.attempt")  # never matches *.parquet
    scored = score_candidates(model, inputs, settings.ranking, attempt, stage1_ads)
    os.replace(attempt, out_path)
    return merge_stats([stats, scored])


def cached_model(settings: Settings, version: str) -> RankingModel:
    """The registered version as a RankingModel, loaded once per process."""
    key = (settings.tracking.mlflow_uri, settings.tracking.registered_model, version, settings.ranking.quantize_int8)
    with _CACHE_LOCK:
        if key not in _MODELS:
            _MODELS.clear()
            _STAGE1.clear()
            pyfunc = registry.load_version(settings, version)
            _MODELS[key] = RankingModel.from_pyfunc(pyfunc, settings.ranking.quantize_int8)
        return _MODELS[key]


def cached_stage1(model: RankingModel, model_key: tuple, inputs: RankingInputs, stats: ScoringStats) -> StageOneAds:
    """The ads' stage-1 terms, computed once per process for the model, run_date, ad texts and prior counts
    (stats count the work only where it is done)."""
    ads = inputs.ads
    keyed = ads.select("ad_id", "ad_text", *[c for c in AD_PRIOR_COLUMNS if c in ads.columns])
    texts = hashlib.sha256(keyed.write_csv().encode()).hexdigest()
    key = (*model_key, inputs.run_date, texts)
    with _CACHE_LOCK:
        if key not in _STAGE1:
            _STAGE1.clear()
            _STAGE1[key] = prepare_stage1(model, ads, stats)
        return _STAGE1[key]


def staged_scores(folder: Path, shards: int) -> Path:
    """The shard folder, once it holds one file per shard (what publish_rankings reads as one table)."""
    found = sorted(p.name for p in folder.glob("shard-*.parquet"))
    if len(found) != shards:
        raise RuntimeError(
            f"{folder}: {len(found)} shard files for {shards} shards ({found}); the workers must write to the "
            "same staging folder as the flow (a shared ADRANK_HOME); nothing was published"
        )
    return folder


def merge_stats(parts: list[ScoringStats]) -> ScoringStats:
    """One ScoringStats for the run: counts and seconds summed over shards."""
    total = ScoringStats(two_stage=any(p.two_stage for p in parts))
    for part in parts:
        for name in ("users", "anchor_pairs", "stage1_pairs", "stage2_pairs", "stage2_unique_texts", "rows"):
            setattr(total, name, getattr(total, name) + getattr(part, name))
        total.ads = max(total.ads, part.ads)
        for stage, seconds in part.seconds.items():
            total.seconds[stage] = total.seconds.get(stage, 0.0) + seconds
    return total


def task_runner(ranking: RankingConfig) -> Any:
    """The Prefect task runner of the shard tasks (prefect-dask is imported only when asked for)."""
    if ranking.task_runner == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=ranking.shards)
    from prefect_dask import DaskTaskRunner

    if ranking.dask_address:
        return DaskTaskRunner(address=ranking.dask_address)
    workers: dict[str, Any] = {"n_workers": ranking.dask_workers, "threads_per_worker": 1, "processes": True}
    if ranking.gpus_per_shard:  # this machine's workers all see its GPUs: one worker per GPU (docs/gpu.md)
        workers["resources"] = {"GPU": ranking.gpus_per_shard}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=workers)


def shard_resources(ranking: RankingConfig) -> contextlib.AbstractContextManager:
    """Dask annotations of the shard tasks submitted inside: {"GPU": n} when ranking.gpus_per_shard is set."""
    if ranking.task_runner != "dask" or not ranking.gpus_per_shard:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources={"GPU": ranking.gpus_per_shard})
