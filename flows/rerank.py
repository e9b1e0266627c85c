"""rerank: the champion model scores active users x active ads; rankings go to DuckDB."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from flows.run_names import name_run
from tasks import logs, pairs, publish, registry, score, shards, warehouse
from tasks.config import Settings, load_settings

current_champion = task(registry.current_champion, name="current_champion", cache_policy=NO_CACHE)
load_version = task(registry.load_version, name="load_champion", cache_policy=NO_CACHE)
served_settings = task(registry.served_settings, name="served_settings", cache_policy=NO_CACHE)
build_ranking_inputs = task(pairs.build_ranking_inputs, name="build_ranking_inputs", cache_policy=NO_CACHE)
ranking_model = task(score.RankingModel.from_pyfunc, name="ranking_model", cache_policy=NO_CACHE)
score_candidates = task(score.score_candidates, name="score_candidates", cache_policy=NO_CACHE)
score_shard = task(shards.score_shard, name="score_shard", cache_policy=NO_CACHE)
publish_rankings = task(publish.publish_rankings, name="publish_rankings", cache_policy=NO_CACHE)
count_ad_daily_ctr = task(logs.count_ad_daily_ctr, name="count_ad_daily_ctr", cache_policy=NO_CACHE)
publish_ad_daily_ctr = task(publish.publish_ad_daily_ctr, name="publish_ad_daily_ctr", cache_policy=NO_CACHE)
SAMPLE_USERS, SAMPLE_ADS_PER_USER = 5, 5  # the run's table artifact: a glance at what users will see


def score_shards(settings: Settings, version: str, inputs: pairs.RankingInputs) -> tuple[Path, score.ScoringStats]:
    """score_shard on each shard of users (tasks/shards.py), on ranking.task_runner; the shard folder once every
    shard has succeeded. A shard that fails after its retries raises here: nothing is published."""
    folder = shards.prepare_shard_dir(settings.staging_dir, inputs.run_date)
    pieces = shards.split_users(inputs, settings.ranking.shards, settings.ranking.user_chunk_size)
    shard_task = score_shard.with_options(retries=settings.ranking.shard_retries)
    with shards.task_runner(settings.ranking) as runner, shards.shard_resources(settings.ranking):
        futures = [
            runner.submit(
                shard_task,
                {"settings": settings, "version": version, "inputs": piece, "out_path": folder / f"shard-{i}.parquet"},
            )
            for i, piece in enumerate(pieces)
        ]
        wait(futures)
        stats = [future.result() for future in futures]
    return shards.staged_scores(folder, len(pieces)), shards.merge_stats(stats)


@flow(name="rerank", log_prints=True)
def rerank(run_date: date | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rank active ads for every recently active user with the `champion` model."""
    settings = load_settings(overrides)
    io = settings.tracking.retry_options()  # MLflow and warehouse I/O retry with backoff
    if run_date is not None:
        settings.ranking.run_date = run_date
    name = settings.tracking.registered_model

    # resolve the model
    version = current_champion.with_options(**io)(settings)
    if version is None:
        raise RuntimeError(
            f"no '{registry.CHAMPION}' alias on model '{name}' at {settings.tracking.mlflow_uri}; "
            "run the retrain flow first"
        )
    model = None if settings.ranking.sharded else load_version.with_options(**io)(settings, version)
    settings = served_settings.with_options(**io)(settings, version)  # texts rendered as the version was trained

    # build texts
    inputs = build_ranking_inputs(settings)
    name_run(f"rerank {inputs.run_date.isoformat()} v{version}")

    # score: two-stage, each user chunk's top N appended to a staged Parquet file (one per shard if sharded)
    if settings.ranking.sharded:
        scores_path, stats = score_shards(settings, version, inputs)
    else:
        scores_path = settings.staging_dir / f"ad_rankings-{inputs.run_date.isoformat()}.parquet"
        ranker = ranking_model(model, settings.ranking.quantize_int8)
        stats = score_candidates(ranker, inputs, settings.ranking, scores_path)

    # publish
    salt, retention = settings.ranking.user_id_salt, timedelta(minutes=settings.ranking.superseded_retention_minutes)
    rows = publish_rankings.with_options(**io)(
        warehouse.of(settings),
        scores_path,
        inputs.run_date,
        name,
        version,
        settings.ranking.top_n,
        salt.get_secret_value() if salt else None,
        retention,
        settings.ranking.objective,
    )
    daily_ctr = count_ad_daily_ctr.with_options(**io)(settings.data, inputs.run_date)
    ctr_days = publish_ad_daily_ctr.with_options(**io)(warehouse.of(settings), daily_ctr, retention)

    summary = {
        "run_date": inputs.run_date.isoformat(),
        "users": inputs.users.height,
        "ads": inputs.ads.height,
        "rows": rows,
        "ad_daily_ctr_days": len(ctr_days),
        "objective": settings.ranking.objective,
        "two_stage": stats.two_stage,
        "stage2_pairs": stats.stage2_pairs,
        "seconds": {stage: round(seconds, 2) for stage, seconds in stats.seconds.items()},
        "model_name": name,
        "model_version": version,
        "warehouse": str(settings.warehouse),
    }
    create_markdown_artifact(
        key="rerank-summary", markdown="\n".join(f"- **{key}**: {value}" for key, value in summary.items())
    )
    create_table_artifact(
        publish.sample_user_rankings(warehouse.of(settings), inputs.run_date, SAMPLE_USERS, SAMPLE_ADS_PER_USER),
        key="rerank-sample-users",
        description=f"Top {SAMPLE_ADS_PER_USER} ads of {SAMPLE_USERS} users for {inputs.run_date}, as published",
    )
    return summary
