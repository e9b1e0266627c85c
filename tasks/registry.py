"""MLflow tracking and registry: one run per retrain, a registered version per run, promotion by alias."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import mlflow
import numpy as np
import pandas as pd
import polars as pl
from deltalake.exceptions import DeltaError
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import MODEL_CONFIG
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array

from tasks import warehouse
from tasks.affinity import SHOWN_TEXT_COLUMN, shown_texts
from tasks.config import PromotionConfig, Settings, flat_params, redact, text_settings, with_text_settings
from tasks.evaluate import FINE_TUNED, Evaluation, to_markdown
from tasks.gates import CHAMPION, Gate, promotion_gates
from tasks.output_layer import PRIOR_COLUMNS
from tasks.publish import publish_model_versions
from tasks.warehouse_upgrade import WarehouseUpgradeError

if TYPE_CHECKING:  # torch: a registry lookup (adrank models) never imports it
    from tasks.pairs import Pairs
    from tasks.train import TrainResult
    from tasks.two_tower import DistillResult

CHALLENGER = "challenger"
CHAMPION_HISTORY_TAG = "champion_history"
METRICS_PER_BATCH = 1000  # the most metrics MLflow takes in one log_batch call
PYFUNC_CODE = Path(__file__).with_name("ctr_pyfunc.py")
# what ctr_pyfunc.py imports: copied into the model (code_paths) so it serves without adrank installed
SERVING_MODULES = ("__init__.py", "affinity.py", "model.py", "output_layer.py", "semantic_match.py", "two_tower.py")
# its exact requirements, pinned to the versions that trained it (torch without a local +cpu/+cu tag)
SERVING_REQUIREMENTS = (
    *("torch", "transformers", "tokenizers", "safetensors", "mlflow", "pandas", "numpy", "polars", "scipy"),
)
SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "user_text"),
            ColSpec("string", "ad_text"),
            ColSpec("string", "ad_id", required=False),
            # double, not long: a JSON null in some rows makes the column float in pandas
            *[ColSpec("double", column, required=False) for column in PRIOR_COLUMNS],
            # the user's past impressions, latest first (the affinity term, tasks/affinity.py)
            ColSpec(Array(DataType.string), SHOWN_TEXT_COLUMN, required=False),
            ColSpec(Array(DataType.boolean), "shown_clicked", required=False),
        ]
    ),
    outputs=Schema([ColSpec("double", "pctr")]),
)

INPUT_EXAMPLE = pd.DataFrame(
    {
        "user_text": ["age: 34, occupation: chef. Recently clicked: Try our cast-iron skillet"],
        "ad_text": ["Get the sourdough starter kit from FreshCrate. Fresh ingredients delivered to your door."],
        "ad_id": ["ad-0001"],
        "user_prior_impressions": [12.0],
        "user_prior_clicks": [5.0],
        "ad_prior_impressions": [340.0],
        "ad_prior_clicks": [17.0],
    }
)


class PromotionError(ValueError):
    """A champion change that cannot be made; nothing was changed."""


@dataclass(frozen=True)
class Promotion:
    version: str
    promoted: bool
    reason: str
    auc: float
    champion_version: str | None
    champion_auc: float | None
    gates: tuple[Gate, ...] = ()


@dataclass(frozen=True)
class Champion:
    """The serving champion as a retrain finds it."""

    version: str
    pctr: np.ndarray | None  # on this run's test split; None when it could not be loaded or scored
    problem: str | None  # why it could not, or None
    data_until: datetime | None  # the last impression of its training logs (None: registered before it was kept)


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server did not answer (after MLflow's own HTTP retries)."""


def configure_tracking(settings: Settings) -> str:
    """Point MLflow at the configured store; create the experiment (artifacts under home) if needed."""
    uri = settings.tracking.mlflow_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        experiment = mlflow.get_experiment_by_name(settings.tracking.experiment)
    except MlflowException as error:
        if error.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE"):
            raise TrackingUnavailable(f"MLflow tracking server {redact(uri)} is unreachable: {error}") from error
        raise
    if experiment is not None:
        return experiment.experiment_id
    settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
    return mlflow.create_experiment(settings.tracking.experiment, artifact_location=settings.artifacts_dir.as_uri())


def start_run(settings: Settings, run_name: str) -> str:
    """A new run holding the resolved config as params; returns its id."""
    experiment_id = configure_tracking(settings)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        mlflow.log_params(flat_params(settings))
        mlflow.log_dict(json.loads(redact(settings.model_dump_json())), "config.json")
    return run.info.run_id


def log_training(settings: Settings, run_id: str, built: Pairs, result: TrainResult) -> None:
    configure_tracking(settings)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_params({f"pairs.{split}_rows": n for split, n in built.rows.items()})
        mlflow.log_metrics({f"logs.{name}": n for name, n in built.log_quality.items()})
        # the data window, for the champion's age (promotion) and the monitor's drift reference
        windows = {"train_from": built.train_from, "valid_from": built.valid_from, "test_from": built.test_from}
        mlflow.set_tags({f"data.{k}": v.isoformat() for k, v in (windows | {"until": built.data_until}).items()})
        for row in result.history:
            step = int(row["step"])
            mlflow.log_metrics({k: v for k, v in row.items() if k != "step" and not math.isnan(v)}, step=step)
        now = int(datetime.now(UTC).timestamp() * 1000)
        losses = [Metric("train_step_loss", loss, now, step) for step, loss in enumerate(result.step_losses, 1)]
        for start in range(0, len(losses), METRICS_PER_BATCH):
            MlflowClient().log_batch(run_id, metrics=losses[start : start + METRICS_PER_BATCH])
        mlflow.log_metrics(
            {
                "best_valid_logloss": result.best_valid_logloss,
                "train_steps": result.steps,
                "kept_step": result.best_step,
                "valid_clicks": result.valid_clicks,
            }
        )
        # the selection decisions: the best trained step's served validation score minus the priors alone, and
        # step 0's with the tuned match minus with the zero-shot one
        gains = {
            f"selection.{name}.{metric}{suffix}": value
            for name in ("text_gain", "match_gain")
            for metric, gain in getattr(result, name).items()
            for suffix, value in (("", gain.mean), ("_low", gain.low), ("_high", gain.high))
            if not math.isnan(value)
        }
        mlflow.log_metrics(gains)
        if "match" in settings.model.terms:
            mlflow.set_tag("match_encoder", "tuned" if result.match_tuned else "zero_shot")
        if result.best_step == 0:
            print(
                "warning: early stopping kept step 0: fine-tuning did not beat step 0 on validation, so the model "
                "serves its output layer without the fine-tuned logit (the priors, and the semantic match if "
                "configured: fine-tuned logit weight 0)"
            )
        mlflow.set_tag("stopped_early", str(result.stopped_early))


def log_distillation(settings: Settings, run_id: str, result: DistillResult) -> None:
    configure_tracking(settings)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"stage1.{k}": float(v) for k, v in asdict(result).items() if not math.isnan(v)})


def log_evaluation(settings: Settings, run_id: str, evaluation: Evaluation, valid_pctr: np.ndarray | None) -> None:
    """Each (model, slice) metric as `test.<model>.<slice>.<metric>`, the table as an artifact, and the
    plots of tasks/plots.py under plots/ (valid_pctr: the served validation pCTR, for the histogram)."""
    configure_tracking(settings)
    table = evaluation.table
    with mlflow.start_run(run_id=run_id):
        from tasks.plots import evaluation_figures  # matplotlib, for runs that evaluate

        for name, figure in evaluation_figures(evaluation, valid_pctr).items():
            mlflow.log_figure(figure, f"plots/{name}")
        mlflow.log_text(to_markdown(table), "evaluation.md")
        for row in table.iter_rows(named=True):
            prefix = f"test.{row['model']}.{row['slice']}"
            values = {k: v for k, v in row.items() if isinstance(v, float | int) and k not in ("model", "slice")}
            mlflow.log_metrics(
                {f"{prefix}.{k}".replace("@", "_at_"): float(v) for k, v in values.items() if not math.isnan(v)}
            )
        mlflow.log_table(table.to_pandas(), "evaluation.json")


def register_model(settings: Settings, run_id: str, checkpoint: Path) -> str:
    """Log the checkpoint as an MLflow pyfunc model, register it and alias it `challenger`.

    Idempotent per run: a retry after a failure part-way (e.g. a tracking-server outage) finishes the
    version the run already registered instead of registering another one.
    """
    configure_tracking(settings)
    name = settings.tracking.registered_model
    # names are validated ([A-Za-z0-9_.-]) and run ids are hex: safe inside the filter string
    existing = MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = str(min(int(v.version) for v in existing))
        MlflowClient().set_registered_model_alias(name, CHALLENGER, version)
        return version
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory() as code:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(_serving_code(Path(code)))],
            model_config={
                "max_seq_length": settings.model.max_seq_length,
                "batch_size": settings.training.eval_batch_size,
                "text_settings": text_settings(settings),  # how its inputs were rendered: served_settings
            },
            signature=SIGNATURE,
            input_example=INPUT_EXAMPLE,  # MLflow loads the model and scores this once: a smoke test
            pip_requirements=serving_requirements(),
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    client.set_registered_model_alias(name, CHALLENGER, version)
    description, tags = version_card(settings, client.get_run(run_id))
    client.update_model_version(name, version, description=description)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return version


def serving_requirements() -> list[str]:
    return [f"{p}=={package_version(p).split('+')[0]}" for p in SERVING_REQUIREMENTS]


def _serving_code(folder: Path) -> Path:
    """A `tasks` package holding only the modules the served model imports."""
    package = folder / "tasks"
    package.mkdir()
    for module in SERVING_MODULES:
        shutil.copy(Path(__file__).with_name(module), package / module)
    return package


def version_card(settings: Settings, run: mlflow.entities.Run) -> tuple[str, dict[str, str]]:
    """A registered version's description and tags: what it was trained on, from what, by which code."""
    tags, params = run.data.tags, run.data.params
    facts = {
        "data.train_from": tags.get("data.train_from", ""),
        "data.until": tags.get("data.until", ""),
        "pairs.train_rows": params.get("pairs.train_rows", ""),
        "base_model": redact(settings.model.base_model),
        "git_commit": git_commit(),
        "run_id": run.info.run_id,
    }
    description = (
        f"adrank CTR cross-encoder fine-tuned from {Path(facts['base_model']).name} on {facts['pairs.train_rows']} "
        f"training pairs of the logs {facts['data.train_from'][:10]} to {facts['data.until'][:10]} "
        f"(run {run.info.run_id}, code {facts['git_commit'][:12]}). Input: user_text, ad_text[, ad_id, "
        "user_prior_impressions, user_prior_clicks, ad_prior_impressions, ad_prior_clicks]; output: pCTR."
    )
    return description, facts


def git_commit() -> str:
    """The commit of the adrank checkout that trained the model; 'unknown' outside a git checkout."""
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return found.stdout.strip() if found.returncode == 0 else "unknown"


def current_champion(settings: Settings) -> str | None:
    """The version that holds the `champion` alias, or None."""
    configure_tracking(settings)
    try:
        return str(MlflowClient().get_model_version_by_alias(settings.tracking.registered_model, CHAMPION).version)
    except MlflowException as error:
        # no such model or alias; anything else (an outage) must not pass for "no champion yet"
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def load_version(settings: Settings, version: str) -> mlflow.pyfunc.PyFuncModel:
    configure_tracking(settings)
    path = list(sys.path)
    try:
        return mlflow.pyfunc.load_model(f"models:/{settings.tracking.registered_model}/{version}")
    finally:
        # mlflow prepends the model's code folder (a `tasks` package of the serving modules only) to sys.path
        # for good; processes started later with this sys.path (Dask LocalCluster workers) would import it
        # instead of adrank's tasks. What the model needed is imported by now.
        sys.path[:] = path


def served_settings(settings: Settings, version: str) -> Settings:
    """settings with the text settings the version was trained with (its model_config, tasks/config.py
    TEXT_SETTINGS): rerank, the monitor and explain render a version's inputs as it was trained, whatever this
    run's config says, and say so when they differ. Versions registered before adrank stored them keep
    this run's settings, with a warning."""
    configure_tracking(settings)
    uri = f"models:/{settings.tracking.registered_model}/{version}"
    flavor = mlflow.models.get_model_info(uri).flavors.get("python_function", {})
    stored = flavor.get(MODEL_CONFIG, {}).get("text_settings")  # the model_config it was logged with
    if stored is None:
        print(
            f"warning: version {version} stores no text settings (registered before adrank kept them); "
            "its texts are rendered with this run's config"
        )
        return settings
    served, changed = with_text_settings(settings, stored)
    if changed:
        print(
            f"version {version} renders its inputs with the text settings it was trained with, not this run's "
            f"config: {'; '.join(changed)}"
        )
    return served


def champion_settings(settings: Settings, version: str) -> Settings:
    """served_settings of the champion a retrain compares against; this run's settings when the version's
    model cannot be read (assess_champion then says why, and the champion gives way)."""
    try:
        return served_settings(settings, version)
    except TrackingUnavailable:
        raise
    except Exception as error:  # a broken or deleted version: assess_champion reports it
        print(f"warning: the text settings of champion version {version} cannot be read: {type(error).__name__}")
        return settings


def assess_champion(settings: Settings, version: str, pairs_path: Path) -> Champion:
    """The champion's pCTR on pairs_path, or why it cannot be had: a champion that no longer loads must
    not block a retrain. Tracking-server outages still raise (the flow retries them)."""
    configure_tracking(settings)
    data_until = version_data_until(settings, version)
    try:
        return Champion(version, score_version(settings, version, pairs_path), None, data_until)
    except TrackingUnavailable:
        raise
    except Exception as error:  # a broken or deleted version: recorded, the retrain goes on
        problem = f"version {version} cannot be loaded or scored: {type(error).__name__}: {error}"
        print(f"warning: champion {problem}; a challenger that passes the other gates replaces it")
        return Champion(version, None, problem[:1000], data_until)


def version_data_until(settings: Settings, version: str) -> datetime | None:
    """When the training logs of a registered version ended (tag data.until of its run), or None."""
    until = version_run(settings, version).data.tags.get("data.until")
    return datetime.fromisoformat(until) if until else None


def champion_gives_way(champion: Champion | None, data_until: datetime, cfg: PromotionConfig) -> str | None:
    """Why the champion yields to any challenger passing the absolute gates (unloadable or stale), or None."""
    if champion is None:
        return None
    if champion.problem:
        return f"champion {champion.problem}"
    max_age = cfg.max_champion_age_days
    if max_age is not None and champion.data_until is not None:
        age = (data_until - champion.data_until).total_seconds() / 86400
        if age > max_age:
            return (
                f"champion version {champion.version} is stale: its logs ended {champion.data_until:%Y-%m-%d %H:%M}, "
                f"{age:.1f} days before this run's (> promotion.max_champion_age_days {max_age:g})"
            )
    return None


def version_run(settings: Settings, version: str) -> mlflow.entities.Run:
    """The retrain run that registered a version (its metrics, tags and data window)."""
    configure_tracking(settings)
    client = MlflowClient()
    return client.get_run(client.get_model_version(settings.tracking.registered_model, version).run_id)


# model_versions columns -> the retrain run's metric of the fine-tuned model (log_evaluation)
VERSION_METRICS = {
    f"{prefix}_{metric}": f"test.{FINE_TUNED}.{slice_name}.{metric}"
    for prefix, slice_name in (("test", "overall"), ("cold_start", "cold_start"))
    for metric in ("auc", "logloss", "ece")
}
MODEL_VERSIONS_SCHEMA = {
    "model_name": pl.String,
    "model_version": pl.String,
    "aliases": pl.List(pl.String),
    "is_champion": pl.Boolean,
    "run_id": pl.String,
    "data_from_at": pl.Datetime("us"),
    "data_until_at": pl.Datetime("us"),
    **dict.fromkeys(VERSION_METRICS, pl.Float64),
    "is_promoted": pl.Boolean,
    "promotion_reason": pl.String,
    "became_champion_at": pl.Datetime("us"),
    "became_champion_reason": pl.String,
    "created_at": pl.Datetime("us"),
}


def model_versions(settings: Settings) -> pl.DataFrame:
    """One row per registered version (MODEL_VERSIONS_SCHEMA), for the warehouse's `model_versions`: its
    aliases, retrain run, data window, offline test metrics and the retrain's promotion decision."""
    configure_tracking(settings)
    client, name = MlflowClient(), settings.tracking.registered_model
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    aliases = client.get_registered_model(name).aliases if versions else {}  # {alias: version}
    rows = [_version_row(client, version, aliases) for version in versions]
    return pl.DataFrame(rows, schema=MODEL_VERSIONS_SCHEMA, orient="row")


def _version_row(client: MlflowClient, version, aliases: dict[str, str]) -> tuple:
    run = client.get_run(version.run_id)
    tags, metrics = run.data.tags, run.data.metrics
    promotion = json.loads(version.tags.get("promotion", "{}"))  # set by promote_if_better
    since, _, reason = version.tags.get("champion_since", "").partition(": ")  # set by _set_champion
    held = sorted(alias for alias, held_by in aliases.items() if str(held_by) == str(version.version))
    return (
        version.name,
        str(version.version),
        held,
        CHAMPION in held,
        version.run_id,
        *(_naive_utc(tags.get(f"data.{key}")) for key in ("train_from", "until")),
        *(metrics.get(metric) for metric in VERSION_METRICS.values()),
        promotion.get("promoted"),
        promotion.get("reason"),
        _naive_utc(since or None),
        reason or None,
        datetime.fromtimestamp(version.creation_timestamp / 1000, UTC).replace(tzinfo=None),
    )


def _naive_utc(iso: str | None) -> datetime | None:
    """An ISO timestamp as naive UTC (as the warehouse stores timestamps), or None."""
    if not iso:
        return None
    moment = datetime.fromisoformat(iso)
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def snapshot_model_versions(settings: Settings) -> None:
    """Publish model_versions to the warehouse after a champion change outside a retrain (adrank promote,
    rollback). A failure is printed, not raised: the change itself is made, and the next retrain, promote
    or rollback publishes the registry again."""
    retention = timedelta(minutes=settings.ranking.superseded_retention_minutes)
    try:
        publish_model_versions(warehouse.of(settings), model_versions(settings), retention)
    except (MlflowException, OSError, duckdb.Error, DeltaError, WarehouseUpgradeError) as error:
        print(f"warning: model_versions not published to {settings.warehouse}: {type(error).__name__}: {error}")


def log_monitoring(run_id: str, run_date: date, metrics: pl.DataFrame, drift: pl.DataFrame) -> None:
    """A monitored day's metrics on the version's retrain run: `monitor.<slice>.<metric>` and
    `monitor.drift.<input>`, at step = days since 1970-01-01 and timestamped at the day."""
    step = (run_date - date(1970, 1, 1)).days
    timestamp = int(datetime.combine(run_date, datetime.min.time(), UTC).timestamp() * 1000)
    values = {}
    for row in metrics.iter_rows(named=True):
        for key, value in row.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value):
                values[_metric_name(f"monitor.{row['slice']}.{key}")] = float(value)
    for name, psi, value in drift.select("input", "psi", "value").iter_rows():
        figure = psi if psi is not None else value
        if figure is not None and not math.isnan(figure):
            values[_metric_name(f"monitor.drift.{name}")] = float(figure)
    MlflowClient().log_batch(
        run_id, metrics=[Metric(key, value, timestamp, step) for key, value in values.items()], synchronous=True
    )


def _metric_name(name: str) -> str:
    """MLflow metric names allow letters, digits, '_', '-', '.', ' ', '/': a slice 'gender=female' becomes
    'gender/female'."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name.replace("=", "/"))


def score_version(settings: Settings, version: str, pairs_path: Path) -> np.ndarray:
    """pCTR of a registered version on a pairs file (e.g. the champion on this run's test split); the shown ads'
    texts, where the pairs carry their ids, from the ad texts beside it."""
    from tasks.pairs import read_ad_texts

    pairs = pl.read_parquet(pairs_path)
    if "shown_ad_ids" in pairs.columns:
        pairs = pairs.with_columns(shown_texts(pairs, read_ad_texts(pairs_path.parent)))
    return predict_pctr(load_version(settings, version), pairs)


def predict_pctr(model: mlflow.pyfunc.PyFuncModel, frame: pl.DataFrame) -> np.ndarray:
    """pCTR for each row of a frame with ad_id, user_text and ad_text (and the prior counts and the shown ads'
    texts and clicks, if present; a column a version does not declare is not passed)."""
    inputs = {c: frame[c].cast(pl.String).to_list() for c in ("user_text", "ad_text", "ad_id")}
    schema = model.metadata.get_input_schema()
    declared = {spec.name: spec.type for spec in schema.inputs} if schema else {}
    for column in (c for c in PRIOR_COLUMNS if c in frame.columns):
        # versions registered before nullable priors declared the counts long; since then double
        dtype = pl.Float64 if declared.get(column) == DataType.double else pl.Int64
        inputs[column] = frame[column].cast(dtype).to_list()
    for column in (SHOWN_TEXT_COLUMN, "shown_clicked"):
        if column in frame.columns and column in declared:
            inputs[column] = frame[column].to_list()
    return np.asarray(model.predict(pd.DataFrame(inputs)), dtype=np.float64)


# fixed pairs every registered version must score (finite, in (0, 1), the same twice) before promotion
SMOKE_EXAMPLES = pd.concat(
    [
        INPUT_EXAMPLE,
        pd.DataFrame(
            {
                "user_text": ["Recently clicked: nothing yet", "age: 61. Recently clicked: " + "garden tools | " * 40],
                "ad_text": ["", "Seeds and bulbs for spring. Order today."],
                "ad_id": ["never-seen-ad", "ad-0001"],
                "user_prior_impressions": [0.0, 5000.0],
                "user_prior_clicks": [0.0, 5000.0],
                "ad_prior_impressions": [0.0, 100000.0],
                "ad_prior_clicks": [0.0, 0.0],
            }
        ),
    ],
    ignore_index=True,
)


def smoke_test(settings: Settings, version: str) -> str | None:
    """Load the registered version as a user would and score SMOKE_EXAMPLES twice; the problem, or None."""
    try:
        model = load_version(settings, version)
        first, second = (np.asarray(model.predict(SMOKE_EXAMPLES), dtype=np.float64) for _ in range(2))
    except Exception as error:  # any failure to load or score is a failed gate, recorded, not a crash
        return f"loading or scoring failed: {type(error).__name__}: {error}"
    if first.shape != (len(SMOKE_EXAMPLES),) or not np.all(np.isfinite(first)):
        return f"non-finite or misshapen scores: {first}"
    if np.any(first <= 0) or np.any(first >= 1):
        return f"scores outside (0, 1): {first}"
    if not np.array_equal(first, second):
        return f"scores differ between two calls: {first} vs {second}"
    return None


def promote_if_better(
    settings: Settings,
    run_id: str,
    version: str,
    current: Champion | None,
    evaluation: Evaluation,
    data_until: datetime,
    kept_step: int,
) -> Promotion:
    """Move `champion` to version only if every gate (tasks/gates.py) passes; record the gates on the run and
    the version. evaluation: the test split scored by the challenger, popularity and (if it could be loaded)
    the champion; data_until: the last impression of this run's logs, against which the champion's age is
    judged; kept_step: the challenger's kept fine-tuning step (0: it serves the priors alone)."""
    yields = champion_gives_way(current, data_until, settings.promotion)
    smoke = smoke_test(settings, version)
    gates = promotion_gates(evaluation, kept_step, smoke, settings.promotion, yields)
    promoted = all(gate.passed for gate in gates)
    reason = "; ".join(g.detail for g in gates if not g.passed) or "; ".join(g.detail for g in gates)
    configure_tracking(settings)
    client, name = MlflowClient(), settings.tracking.registered_model
    if promoted:
        move_champion(settings, version, reason=f"retrain run {run_id}: {gates[1].detail}")
    overall = {r["model"]: r for r in evaluation.table.filter(pl.col("slice") == "overall").iter_rows(named=True)}
    champion_auc = overall[CHAMPION]["auc"] if CHAMPION in overall else None
    champion_version = current.version if current else None
    decision = Promotion(
        version, promoted, reason, overall[FINE_TUNED]["auc"], champion_version, champion_auc, tuple(gates)
    )
    client.set_model_version_tag(name, version, "promotion", json.dumps(asdict(decision)))
    client.set_tag(run_id, "promotion.promoted", str(promoted))
    client.set_tag(run_id, "promotion.reason", reason[:5000])
    client.set_tag(run_id, "promotion.gates", json.dumps([asdict(g) for g in gates])[:5000])
    return decision


def champion_history(settings: Settings) -> list[str]:
    """Versions that held `champion`, oldest first (kept as a tag on the registered model)."""
    configure_tracking(settings)
    tags = MlflowClient().get_registered_model(settings.tracking.registered_model).tags
    return json.loads(tags.get(CHAMPION_HISTORY_TAG, "[]"))


def move_champion(settings: Settings, version: str, reason: str) -> None:
    """Promote: point `champion` at version and push it on the champion history (once, if retried)."""
    history = champion_history(settings)
    if history[-1:] != [str(version)]:
        history.append(str(version))
    _set_champion(settings, str(version), history, reason)


def rollback_champion(settings: Settings) -> str:
    """Give `champion` back to the version that held it before the current one; returns that version."""
    history, current = champion_history(settings), current_champion(settings)
    if current is None or len(history) < 2:
        raise PromotionError(f"model '{settings.tracking.registered_model}' has no earlier champion to roll back to")
    if history[-1] != current:
        raise PromotionError(f"champion is version {current} but adrank last set {history[-1]}; promote explicitly")
    _set_champion(settings, history[-2], history[:-1], reason=f"rollback from version {current}")
    return history[-2]


def _set_champion(settings: Settings, version: str, history: list[str], reason: str) -> None:
    configure_tracking(settings)
    client, name = MlflowClient(), settings.tracking.registered_model
    client.get_model_version(name, version)  # raises for an unknown version before anything changes
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, CHAMPION_HISTORY_TAG, json.dumps(history))
    client.set_model_version_tag(name, version, "champion_since", f"{datetime.now(UTC).isoformat()}: {reason}")
    print(f"{name}: champion -> version {version} ({reason})")


def promotion_markdown(decision: Promotion, table: pl.DataFrame) -> str:
    """The retrain summary: the decision, each gate passed or failed with its reason, the evaluation."""
    verdict = "promoted to champion" if decision.promoted else "not promoted"
    gates = "\n".join(f"| {g.name} | {'passed' if g.passed else '**failed**'} | {g.detail} |" for g in decision.gates)
    return (
        f"## Version {decision.version}: {verdict}\n\n| gate | result | why |\n|---|---|---|\n{gates}\n\n"
        f"## Test split\n\n{to_markdown(table)}"
    )


def version_gates(settings: Settings) -> dict[str, list[dict]]:
    """Each registered version -> the promotion gates its retrain judged it on (name, passed, detail)."""
    configure_tracking(settings)
    name = settings.tracking.registered_model
    return {
        str(v.version): json.loads(v.tags.get("promotion", "{}")).get("gates", [])
        for v in MlflowClient().search_model_versions(f"name = '{name}'")
    }
