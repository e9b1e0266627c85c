"""monitor: each ranked day whose impressions have arrived -> metrics per model version and slice, input
drift -> model_daily_metrics and input_drift in DuckDB, MLflow, and adrank.model.degraded on a breach."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import polars as pl
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.states import Completed

from flows.run_names import name_run
from tasks import logs, publish, registry, warehouse
from tasks import monitor as monitoring
from tasks.config import load_settings

open_logs = task(logs.open_logs, name="open_logs", cache_policy=NO_CACHE)
days_to_monitor = task(monitoring.days_to_monitor, name="days_to_monitor", cache_policy=NO_CACHE)
monitor_day = task(monitoring.monitor_day, name="monitor_day", cache_policy=NO_CACHE)
publish_monitoring = task(publish.publish_monitoring, name="publish_monitoring", cache_policy=NO_CACHE)
log_monitoring = task(registry.log_monitoring, name="log_monitoring", cache_policy=NO_CACHE)


@flow(name="monitor", log_prints=True)
def monitor(run_date: date | None = None, overrides: dict[str, Any] | None = None):
    """Monitor the ranked days whose impressions have arrived (or run_date): how the model that ranked
    each day did, and whether its inputs drifted. A breach emits adrank.model.degraded and ends the run
    in a Completed state named 'Degraded'."""
    settings = load_settings(overrides)
    io = settings.tracking.retry_options()  # MLflow and warehouse I/O retry with backoff
    retention = timedelta(minutes=settings.ranking.superseded_retention_minutes)
    con = open_logs(settings.data.logs, settings.data)

    reports, versions = [], {}  # versions: each model version loaded (and its drift reference scored) once
    for day in days_to_monitor(settings, con, run_date):
        report = monitor_day(settings, con, day, versions)
        tables = {"model_daily_metrics": report.metrics, "input_drift": report.drift}
        publish_monitoring.with_options(**io)(warehouse.of(settings), day, tables, retention)
        log_monitoring.with_options(**io)(report.run_id, day, report.metrics, report.drift)
        if report.breaches:
            name = settings.tracking.registered_model
            emit_event(**monitoring.degraded_event(name, report.version, day, report.breaches, report.metrics))
            print(f"{day}: version {report.version} degraded: " + "; ".join(report.breaches))
        reports.append(report)

    days = [r.run_date.isoformat() for r in reports]
    name_run(f"monitor {days[0]}..{days[-1]}" if len(days) > 1 else f"monitor {days[0] if days else 'nothing new'}")
    summary = {
        "days": days,
        "degraded": {r.run_date.isoformat(): r.breaches for r in reports if r.breaches},
        "warehouse": str(settings.warehouse),
    }
    overall = [r.metrics.filter(pl.col("slice") == "overall") for r in reports]
    create_markdown_artifact(
        key="monitor-summary",
        markdown=monitoring.to_markdown(pl.concat(overall) if overall else None, summary["degraded"]),
    )
    if summary["degraded"]:
        return Completed(name="Degraded", message=f"thresholds breached on {sorted(summary['degraded'])}", data=summary)
    return summary
