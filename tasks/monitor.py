"""Next-day monitoring: how the model that ranked a day did on that day's impressions, and drift.

For a run_date D, every impression of D is scored by the model version that ranked D, with the
features rerank knew (as of the start of D); the metrics are computed per slice, the inputs compared
with the model's training window, and breaches of the configured thresholds listed. Plain functions:
flows/monitor.py composes them with publishing, MLflow and the Prefect event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import duckdb
import numpy as np
import polars as pl

from tasks import warehouse
from tasks.config import MonitorConfig, Settings
from tasks.metrics import calibration_ratio, group_auc, logloss, roc_auc
from tasks.pairs import build_window_pairs
from tasks.publish import published_run_dates, read_rankings
from tasks.registry import load_version, predict_pctr, served_settings, version_run
from tasks.sql_files import load_sql
from tasks.user_keys import lookup_user_ids

DEGRADED_EVENT = "adrank.model.degraded"
PSI_FLOOR = 1e-4  # share given to an empty bin, so PSI stays finite
PSI_BINS = 10  # numeric inputs: deciles of the reference
# numeric profile columns are cut into bands this wide (age 30-39) to form groups
PROFILE_BAND_WIDTH = 10
# numeric inputs compared between the training window and the day
NUMERIC_INPUTS = ("pctr", "user_prior_ctr", "user_prior_impressions", "ad_age_days")
CATEGORICAL_INPUTS = ("category",)


@dataclass(frozen=True)
class DayReport:
    """One monitored run_date: the version that ranked it, its metrics, input drift and any breaches."""

    run_date: date
    version: str
    run_id: str  # the version's retrain run, where the metrics are logged
    metrics: pl.DataFrame
    drift: pl.DataFrame
    breaches: list[str]


def days_to_monitor(settings: Settings, con: duckdb.DuckDBPyConnection, run_date: date | None = None) -> list[date]:
    """run_date if given; else the ranked days with impressions in the logs and no monitoring yet, the
    latest monitor.max_days of them, oldest first."""
    if run_date is not None:
        return [run_date]
    ranked = published_run_dates(warehouse.of(settings), "ad_rankings")
    monitored = set(published_run_dates(warehouse.of(settings), "model_daily_metrics"))
    arrived = {day for (day,) in con.execute(load_sql("impression_days")).fetchall()}
    return [d for d in ranked if d in arrived and d not in monitored][-settings.monitor.max_days :]


@dataclass(frozen=True)
class MonitoredVersion:
    """What monitoring needs of a registered version, loaded once a run however many days it ranked."""

    model: Any  # the MLflow pyfunc model
    run: Any  # its retrain run (metrics, data-window tags)
    settings: Settings  # the run's settings with the version's text settings (registry.served_settings)
    trained_until: datetime | None  # where its training window ended: later ads are new to it (None: untagged)


def load_monitored_version(settings: Settings, version: str) -> MonitoredVersion:
    """The version's model, run, text settings and the end of its training window (None for versions
    registered before adrank tagged their data window: they get no drift reference)."""
    model, run, served = (
        load_version(settings, version),
        version_run(settings, version),
        served_settings(settings, version),
    )
    trained_until = (
        datetime.fromisoformat(run.data.tags["data.valid_from"]) if "data.valid_from" in run.data.tags else None
    )
    if trained_until is None:
        print(f"warning: no drift reference for version {version}: it has no data-window tags")
    return MonitoredVersion(model, run, served, trained_until)


def drift_reference(con: duckdb.DuckDBPyConnection, loaded: MonitoredVersion, run_date: date) -> pl.DataFrame | None:
    """The drift reference of run_date: a fixed sample (monitor.reference_pairs) of the impressions of the
    monitor.reference_days before it, scored by the version as rerank would have; never before the
    version's validation window (it was fitted on its training window, so scores drift from there by
    construction). A recent window, because a stationary market still moves slowly: every user's and ad's
    counts grow, and the priors sharpen with them. PSI against a fixed early window rises with that alone
    (against its training window, benchmarks/monitor.py counted 9 false alarms in 30 stationary days);
    against the last days it rises when something changed from one day to the next. None without a
    training window or logs before run_date."""
    if loaded.trained_until is None:
        return None
    cfg, served, end = loaded.settings.monitor, loaded.settings, datetime.combine(run_date, datetime.min.time())
    start = max(end - timedelta(days=cfg.reference_days), loaded.trained_until)
    if start >= end:
        return None
    pairs = build_window_pairs(con, served.data, start, end, served.ranking.active_window_days, cfg.reference_pairs)
    return pairs.with_columns(pctr=pl.Series(predict_pctr(loaded.model, pairs))) if pairs.height else None


def monitor_day(
    settings: Settings,
    con: duckdb.DuckDBPyConnection,
    run_date: date,
    versions: dict[str, MonitoredVersion] | None = None,
) -> DayReport:
    """Score run_date's impressions with the version that ranked it, as rerank saw them, and compare.
    versions: the run's cache of loaded versions (filled here), so each is loaded once."""
    published = read_rankings(warehouse.of(settings), run_date)
    if published.is_empty():
        raise ValueError(f"{settings.warehouse}: nothing published in ad_rankings for {run_date} to monitor")
    version = published["model_version"][0]
    versions = {} if versions is None else versions
    if version not in versions:
        versions[version] = load_monitored_version(settings, version)
    loaded = versions[version]
    start = datetime.combine(run_date, datetime.min.time())
    served = loaded.settings
    day = build_window_pairs(con, served.data, start, start + timedelta(days=1), served.ranking.active_window_days)
    if day.is_empty():
        raise ValueError(f"{settings.data.logs}: no impressions on {run_date} to monitor")
    pctr = pl.Series(predict_pctr(loaded.model, day))
    day = day.with_columns(pctr=pctr, in_top_n=_in_top_n(settings, day, published))

    users = con.table("stg_users").pl()
    profile_columns = [c for c in users.columns if c != "user_id" and c not in day.columns]
    day = day.join(users.select("user_id", *profile_columns), on="user_id", how="left")
    masks = slices(day, loaded.trained_until, ["category", *profile_columns], settings.monitor.max_group_values)
    metrics = daily_metrics(day, masks, run_date, version)
    reference = drift_reference(con, loaded, run_date)
    drift = input_drift(day.head(0) if reference is None else reference, day, loaded.trained_until, run_date, version)
    found = breaches(metrics, drift, offline_metrics(loaded.run.data.metrics), settings.monitor)
    return DayReport(run_date, version, loaded.run.info.run_id, metrics, drift, found)


def _in_top_n(settings: Settings, day: pl.DataFrame, published: pl.DataFrame) -> pl.Series:
    """Whether each impression's ad was in its user's published top N (user ids hashed as published)."""
    salt = settings.ranking.user_id_salt
    secret = salt and salt.get_secret_value()
    ranked = set(published.select("user_id", "ad_id").iter_rows())
    keys = {user: lookup_user_ids(secret, user) for user in day["user_id"].unique()}  # hashed once per user
    in_top_n = [any((key, a) in ranked for key in keys[u]) for u, a in zip(day["user_id"], day["ad_id"], strict=True)]
    return pl.Series("in_top_n", in_top_n)


@dataclass(frozen=True)
class OfflineMetrics:
    """The version's test-split figures from its retrain run: the baseline the alerts compare with."""

    auc: float
    logloss: float
    ctr: float

    @property
    def normalized_entropy(self) -> float:
        return self.logloss / binary_entropy(self.ctr)


def offline_metrics(run_metrics: dict[str, float], model: str = "fine_tuned") -> OfflineMetrics:
    """A version's overall test AUC, logloss and CTR from its retrain run's metrics (tasks/registry.py)."""
    prefix = f"test.{model}.overall"
    try:
        ctr = run_metrics[f"{prefix}.clicks"] / run_metrics[f"{prefix}.pairs"]
        return OfflineMetrics(run_metrics[f"{prefix}.auc"], run_metrics[f"{prefix}.logloss"], ctr)
    except KeyError as error:
        raise ValueError(f"the version's run has no test metric {error}: was it registered by retrain?") from error


def binary_entropy(ctr: float) -> float:
    """Logloss of always predicting ctr: what normalized entropy divides by."""
    if not 0 < ctr < 1:
        return math.nan
    return -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))


def slices(day: pl.DataFrame, trained_until: datetime | None, group_columns: list[str], max_group_values: int) -> dict:
    """Slice name -> boolean mask over day's rows: overall; ranked_users (the users rerank ranked that day);
    cold_start (ads never shown before the day); ads_seen / ads_unseen (first shown before the version's
    training window ended or after; not without trained_until); users with or without history; one per
    value of each group column (the ad category and the user's profile columns, numeric ones in bands, for
    a bias audit), e.g. 'category=travel', 'age=30-39'."""
    history = (day["user_prior_impressions"] > 0).to_numpy()
    masks = {
        "overall": np.ones(day.height, dtype=bool),
        "ranked_users": day["is_ranked_user"].to_numpy(),
        "cold_start": day["is_cold_start"].to_numpy(),
    }
    if trained_until is not None:
        seen = _seen(day, trained_until)
        masks |= {"ads_seen": seen, "ads_unseen": ~seen}
    masks |= {"users_with_history": history, "users_without_history": ~history}
    for column in group_columns:
        values = day[column]
        if values.dtype.is_numeric():
            low = (values // PROFILE_BAND_WIDTH * PROFILE_BAND_WIDTH).cast(pl.Int64)
            values = pl.Series(
                [None if v is None else f"{v}-{v + PROFILE_BAND_WIDTH - 1}" for v in low.to_list()], dtype=pl.String
            )
        values = values.cast(pl.String).fill_null("unknown")
        groups = values.unique().sort().to_list()
        if len(groups) > max_group_values:
            continue  # an id-like column (city, zip): too many groups to read
        for group in groups:
            masks[f"{column}={group}"] = (values == group).to_numpy()
    return masks


def daily_metrics(day: pl.DataFrame, masks: dict[str, np.ndarray], run_date: date, version: str) -> pl.DataFrame:
    """One row per slice: AUC, gAUC, logloss, normalized entropy, calibration ratio and coverage of the
    published top N. day: is_clicked, pctr, user_id, in_top_n per impression."""
    rows = []
    for name, mask in masks.items():
        part = day.filter(pl.Series(mask))
        labels = part["is_clicked"].cast(pl.Int8).to_numpy()
        pctr = part["pctr"].to_numpy()
        clicks, n = int(labels.sum()), part.height
        ctr = clicks / n if n else math.nan
        inside = part.filter(pl.col("in_top_n"))
        outside = part.filter(~pl.col("in_top_n"))
        loss = logloss(labels, pctr)
        rows.append(
            {
                "run_date": run_date,
                "model_version": version,
                "slice": name,
                "impressions": n,
                "clicks": clicks,
                "ctr": ctr,
                "mean_pctr": float(pctr.mean()) if n else math.nan,
                "auc": roc_auc(labels, pctr),
                "gauc": group_auc(part["user_id"].to_numpy(), labels, pctr) if n else math.nan,
                "logloss": loss,
                "normalized_entropy": loss / binary_entropy(ctr) if n else math.nan,
                "calibration_ratio": calibration_ratio(labels, pctr) if clicks else math.nan,
                "top_n_coverage": inside.height / n if n else math.nan,
                "ctr_in_top_n": inside["is_clicked"].mean() if inside.height else math.nan,
                "ctr_outside_top_n": outside["is_clicked"].mean() if outside.height else math.nan,
            }
        )
    return pl.DataFrame(rows, schema_overrides={"ctr_in_top_n": pl.Float64, "ctr_outside_top_n": pl.Float64})


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index of a numeric input: bins at the reference's deciles."""
    reference, current = np.asarray(reference, dtype=float), np.asarray(current, dtype=float)
    reference, current = reference[np.isfinite(reference)], current[np.isfinite(current)]
    if len(reference) == 0 or len(current) == 0:
        return math.nan
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, PSI_BINS + 1)[1:-1]))
    expected = np.bincount(np.searchsorted(edges, reference, side="left"), minlength=len(edges) + 1)
    actual = np.bincount(np.searchsorted(edges, current, side="left"), minlength=len(edges) + 1)
    return _psi_from_counts(expected, actual)


def psi_categorical(reference: list, current: list) -> float:
    """Population stability index of a categorical input (a missing value is a category of its own)."""
    if not reference or not current:
        return math.nan
    categories = sorted({str(v) for v in reference} | {str(v) for v in current})
    position = {c: i for i, c in enumerate(categories)}
    expected = np.bincount([position[str(v)] for v in reference], minlength=len(categories))
    actual = np.bincount([position[str(v)] for v in current], minlength=len(categories))
    return _psi_from_counts(expected, actual)


def _psi_from_counts(expected: np.ndarray, actual: np.ndarray) -> float:
    e = np.maximum(expected / expected.sum(), PSI_FLOOR)
    a = np.maximum(actual / actual.sum(), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def _seen(pairs: pl.DataFrame, trained_until: datetime) -> np.ndarray:
    """Whether each pair's ad was first shown before the version's training window ended."""
    return (pairs["ad_first_shown_at"] < trained_until).to_numpy()


def input_drift(
    reference: pl.DataFrame, day: pl.DataFrame, trained_until: datetime | None, run_date: date, version: str
) -> pl.DataFrame:
    """One row per input: PSI between the drift reference (drift_reference) and the day; plus the
    share of the day's impressions on ads first shown after the version's training window (value, no PSI;
    NaN without trained_until)."""
    rows = []
    reference, day = _with_user_prior_ctr(reference), _with_user_prior_ctr(day)
    for name in NUMERIC_INPUTS:
        rows.append((name, psi(reference[name].to_numpy(), day[name].to_numpy()), None))
    for name in CATEGORICAL_INPUTS:
        rows.append((f"{name}_mix", psi_categorical(reference[name].to_list(), day[name].to_list()), None))
    unseen = float((~_seen(day, trained_until)).mean()) if day.height and trained_until is not None else math.nan
    rows.append(("unseen_ad_share", None, unseen))
    return pl.DataFrame(
        {
            "run_date": [run_date] * len(rows),
            "model_version": [version] * len(rows),
            "input": [r[0] for r in rows],
            "psi": [r[1] for r in rows],
            "value": [r[2] for r in rows],
            "reference_rows": [reference.height] * len(rows),
            "day_rows": [day.height] * len(rows),
        },
        schema_overrides={"psi": pl.Float64, "value": pl.Float64},
    )


def _with_user_prior_ctr(pairs: pl.DataFrame) -> pl.DataFrame:
    """The user's click rate before the day (NaN without history: left out of its PSI)."""
    rate = pl.col("user_prior_clicks") / pl.col("user_prior_impressions")
    return pairs.with_columns(user_prior_ctr=pl.when(pl.col("user_prior_impressions") > 0).then(rate).otherwise(None))


def breaches(metrics: pl.DataFrame, drift: pl.DataFrame, offline: OfflineMetrics, cfg: MonitorConfig) -> list[str]:
    """The thresholds of cfg the day breaks, each as a sentence; empty on a healthy day. The calibration
    band is judged on every slice with at least cfg.min_impressions impressions (fewer are too noisy to
    judge), NE and AUC on the overall slice (the offline figures are overall), PSI on every input."""
    overall = metrics.filter(pl.col("slice") == "overall").row(0, named=True)
    if overall["impressions"] < cfg.min_impressions:
        return []
    found = []
    judged = metrics.filter(pl.col("impressions") >= cfg.min_impressions)
    for name, ratio in judged.select("slice", "calibration_ratio").iter_rows():
        if math.isnan(ratio) or not cfg.min_calibration_ratio <= ratio <= cfg.max_calibration_ratio:
            found.append(
                f"calibration ratio {ratio:.3f} outside [{cfg.min_calibration_ratio}, {cfg.max_calibration_ratio}] "
                f"on {name}"
            )
    ne, offline_ne = overall["normalized_entropy"], offline.normalized_entropy
    if ne > offline_ne + cfg.max_ne_increase:
        found.append(f"normalized entropy {ne:.4f} > offline {offline_ne:.4f} + {cfg.max_ne_increase}")
    auc = overall["auc"]
    if not math.isnan(auc) and auc < offline.auc - cfg.max_auc_drop:
        found.append(f"AUC {auc:.4f} < offline {offline.auc:.4f} - {cfg.max_auc_drop}")
    alerting = drift.filter(pl.col("input").is_in(cfg.psi_inputs) & (pl.col("psi") > cfg.max_psi))
    for name, value in alerting.select("input", "psi").iter_rows():
        found.append(f"PSI of {name} {value:.3f} > {cfg.max_psi}")
    return found


def degraded_event(name: str, version: str, run_date: date, found: list[str], metrics: pl.DataFrame) -> dict:
    """Keyword arguments of prefect.events.emit_event for a day whose monitoring breached a threshold."""
    overall = metrics.filter(pl.col("slice") == "overall").row(0, named=True)
    payload = {k: v for k, v in overall.items() if isinstance(v, int | float) and not math.isnan(v)}
    return {
        "event": DEGRADED_EVENT,
        "resource": {
            "prefect.resource.id": f"adrank.model.{name}.{version}",
            "prefect.resource.name": f"{name} version {version}",
        },
        "payload": {"run_date": run_date.isoformat(), "breaches": found, "metrics": payload},
        "occurred": datetime.now(UTC),
    }


def to_markdown(overall: pl.DataFrame | None, degraded: dict[str, list[str]]) -> str:
    """The monitor run's summary for the Prefect UI: the overall metrics per day, then any breaches."""
    if overall is None:
        return "No ranked day with impressions left to monitor."
    columns = ["run_date", "model_version", "impressions", "auc", "gauc", "normalized_entropy", "calibration_ratio"]
    rounded = overall.select(columns).with_columns(pl.col(pl.Float64).round(4))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rounded.iter_rows()]
    lines += [f"\n**{day}**: " + "; ".join(found) for day, found in degraded.items()] or ["\nNo threshold breached."]
    return "\n".join(lines)
