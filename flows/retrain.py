"""retrain: logs -> pairs -> fine-tuned cross-encoder -> evaluation -> MLflow registry (+ promotion)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.run_names import name_run
from tasks import evaluate, pairs, publish, registry, train_worker, two_tower, warehouse
from tasks.config import load_settings

build_pairs = task(pairs.build_pairs, name="build_pairs", cache_policy=NO_CACHE)
start_run = task(registry.start_run, name="start_mlflow_run", cache_policy=NO_CACHE)
fine_tune = task(train_worker.train_model, name="fine_tune", cache_policy=NO_CACHE)  # torchrun if processes > 1
distill_two_tower = task(two_tower.distill_two_tower, name="distill_two_tower", cache_policy=NO_CACHE)
log_training = task(registry.log_training, name="log_training", cache_policy=NO_CACHE)
log_distillation = task(registry.log_distillation, name="log_distillation", cache_policy=NO_CACHE)
current_champion = task(registry.current_champion, name="current_champion", cache_policy=NO_CACHE)
evaluate_models = task(evaluate.evaluate_models, name="evaluate", cache_policy=NO_CACHE)
log_evaluation = task(registry.log_evaluation, name="log_evaluation", cache_policy=NO_CACHE)
register_model = task(registry.register_model, name="register_model", cache_policy=NO_CACHE)
promote_if_better = task(registry.promote_if_better, name="promote_if_better", cache_policy=NO_CACHE)
assess_champion = task(registry.assess_champion, name="assess_champion", cache_policy=NO_CACHE)
champion_settings = task(registry.champion_settings, name="champion_settings", cache_policy=NO_CACHE)
test_pairs_as = task(pairs.test_pairs_as, name="test_pairs_as_the_champion_was_trained", cache_policy=NO_CACHE)
list_model_versions = task(registry.model_versions, name="list_model_versions", cache_policy=NO_CACHE)
publish_model_versions = task(publish.publish_model_versions, name="publish_model_versions", cache_policy=NO_CACHE)


@flow(name="retrain", log_prints=True)
def retrain(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune on the latest logs, register the model, promote it if it beats the champion."""
    settings = load_settings(overrides)
    io = settings.tracking.retry_options()  # MLflow and warehouse I/O retry with backoff

    # build pairs
    built = build_pairs(settings)
    run_name = f"retrain logs to {built.data_until:%Y-%m-%d}"
    name_run(run_name)
    run_id = start_run.with_options(**io)(settings, run_name=run_name)

    # fine-tune
    checkpoint = settings.checkpoints_dir / run_id
    result = fine_tune(settings, built.paths["train"], built.paths["valid"], checkpoint)
    log_training.with_options(**io)(settings, run_id, built, result)

    # distil the stage-1 two-tower of rerank from the fine-tuned cross-encoder
    distilled = distill_two_tower(settings, checkpoint, built.paths["train"])
    log_distillation.with_options(**io)(settings, run_id, distilled)

    # evaluate, against the champion on the same test split
    # (a champion that no longer loads is reported, not fatal: it yields to a challenger passing the gates)
    champion_version, champion = current_champion.with_options(**io)(settings), None
    if champion_version:  # scored on the same test impressions, their texts rendered as it was trained
        as_trained = champion_settings.with_options(**io)(settings, champion_version)
        test_path = test_pairs_as(settings, built, as_trained)
        champion = assess_champion.with_options(**io)(settings, champion_version, test_path)
    others = {registry.CHAMPION: champion.pctr} if champion and champion.pctr is not None else {}
    evaluation = evaluate_models(settings, built.paths["train"], built.paths["test"], checkpoint, others)
    log_evaluation.with_options(**io)(settings, run_id, evaluation, result.valid_pctr)
    table = evaluation.table

    # register and promote
    version = register_model.with_options(**io)(settings, run_id, checkpoint)
    decision = promote_if_better.with_options(**io)(
        settings, run_id, version, champion, evaluation, built.data_until, result.best_step
    )

    # publish the registry's versions for analysts (model_versions)
    retention = timedelta(minutes=settings.ranking.superseded_retention_minutes)
    versions = list_model_versions.with_options(**io)(settings)
    publish_model_versions.with_options(**io)(warehouse.of(settings), versions, retention)

    name_run(f"{run_name}: v{version} {'promoted' if decision.promoted else 'not promoted'}")
    create_markdown_artifact(key="retrain-summary", markdown=registry.promotion_markdown(decision, table))
    return {
        "run_id": run_id,
        "version": version,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "gates": [{"name": g.name, "passed": g.passed, "detail": g.detail} for g in decision.gates],
        "kept_step": result.best_step,
        "champion_problem": champion.problem if champion else None,
        "evaluation": table.to_dicts(),
        "pairs": built.rows,
    }
