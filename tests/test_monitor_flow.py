"""The monitor flow under a real Prefect API: a day with a known shift raises adrank.model.degraded."""

from __future__ import annotations

import asyncio
import shutil
import time
from datetime import date, timedelta
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
import yaml
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

from flows.monitor import monitor
from flows.rerank import rerank
from flows.retrain import retrain
from tasks.config import SampleDataConfig
from tasks.monitor import DEGRADED_EVENT
from tasks.sample_data import generate_sample_logs
from tests.conftest import build_settings

REPO = Path(__file__).resolve().parents[1]

# 4 advertisers, so 4 topics: the most shown category reaches min_impressions on the shifted day
MARKET = SampleDataConfig(
    users=300, advertisers=4, ads=24, days=12, requests_per_user_day=2.0, ads_per_request=1, cold_start_days=2
)
SHIFTED_DAY = MARKET.start_date + timedelta(days=MARKET.days - 1)  # the last day: one category's CTR halved
HEALTHY_DAY = SHIFTED_DAY - timedelta(days=1)
# per-slice calibration is judged from 150 impressions (~20 clicks); the band is wide for a tiny random model
# on 600 impressions a day (a healthy day's slices reach 1.5), narrow enough for a halved CTR (about 2.5)
MONITOR = {"min_impressions": 150, "min_calibration_ratio": 0.5, "max_calibration_ratio": 2.0}
LOOSE_GATES = {"max_ece": 0.3, "max_logloss_gap": 0.3}


def copy_logs(source, target, keep_days_before: date | None = None):
    shutil.copytree(source, target)
    if keep_days_before is not None:
        for part in (target / "impressions").glob("date=*"):
            if date.fromisoformat(part.name.split("=")[1]) >= keep_days_before:
                shutil.rmtree(part)
    return target


def halve_clicks_of_one_category(logs, day: date) -> str:
    """Unclick half the clicks on the day's most shown category; returns that category."""
    part = next((logs / "impressions" / f"date={day.isoformat()}").glob("*.parquet"))
    impressions = pl.read_parquet(part)
    ads = pl.read_parquet(logs / "ads").select("ad_id", "category")
    category = impressions.join(ads, on="ad_id")["category"].value_counts(sort=True)["category"][0]
    in_category = impressions.join(ads, on="ad_id", how="left")["category"] == category
    coin = np.random.default_rng(11).random(impressions.height) < 0.5
    shifted = impressions.with_columns(clicked=pl.col("clicked") & ~pl.Series(in_category.to_numpy() & coin))
    shifted.write_parquet(part)
    return category


def degraded_events(since) -> list:
    async def read():
        async with get_client() as client:
            page = await client.read_events(
                EventFilter(event=EventNameFilter(name=[DEGRADED_EVENT]), occurred=EventOccurredFilter(since=since)),
                limit=50,  # the server's maximum page
            )
            return page.events

    return asyncio.run(read())


@pytest.mark.fault
def test_a_halved_ctr_shows_in_the_metrics_and_raises_the_degraded_event(prefect_api, tmp_path, tiny_model_dir):
    market = tmp_path / "market"
    generate_sample_logs(MARKET, market)
    trained_on = copy_logs(market, tmp_path / "until-healthy-day", keep_days_before=HEALTHY_DAY)
    logs = copy_logs(market, tmp_path / "logs")
    category = halve_clicks_of_one_category(logs, SHIFTED_DAY)

    settings = build_settings(tmp_path / "home", tiny_model_dir, trained_on, promotion=LOOSE_GATES, monitor=MONITOR)
    assert retrain(settings.model_dump(mode="json"))["promoted"]
    served = build_settings(settings.home, tiny_model_dir, logs, promotion=LOOSE_GATES, monitor=MONITOR).model_dump(
        mode="json"
    )
    for day in (HEALTHY_DAY, SHIFTED_DAY):  # the nightly rerank of each day, before its clicks exist
        rerank(run_date=day, overrides=served)

    started = time.time() - 60
    state = monitor(overrides=served, return_state=True)
    summary = state.result()
    assert summary["days"] == [HEALTHY_DAY.isoformat(), SHIFTED_DAY.isoformat()]
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        metrics = con.execute("select * from model_daily_metrics order by run_date, slice").pl()
        drift = con.execute("select * from input_drift order by run_date, input").pl()
    ratio = {
        day: metrics.filter((pl.col("run_date") == day) & (pl.col("slice") == f"category={category}"))[
            "calibration_ratio"
        ][0]
        for day in (HEALTHY_DAY, SHIFTED_DAY)
    }
    table = metrics.select("run_date", "slice", "impressions", "ctr", "calibration_ratio", "auc")
    assert ratio[SHIFTED_DAY] > 1.6 * ratio[HEALTHY_DAY], table  # half the clicks: twice the pCTR per click

    # the event fired for the shifted day only, and the run is marked
    assert state.name == "Degraded", summary
    assert list(summary["degraded"]) == [SHIFTED_DAY.isoformat()], (summary, table)
    assert f"on category={category}" in " ".join(summary["degraded"][SHIFTED_DAY.isoformat()])
    deadline, events = time.monotonic() + 60, []
    while not events and time.monotonic() < deadline:  # the server stores events asynchronously
        events = degraded_events(started)
        time.sleep(1)
    assert [e.payload["run_date"] for e in events] == [SHIFTED_DAY.isoformat()]
    assert events[0].resource.id == f"adrank.model.{settings.tracking.registered_model}.1"

    # every slice of both days, drift rows, and the metrics on the version's MLflow run, a step per day
    slices = {"overall", "ranked_users", "cold_start", "ads_seen", "ads_unseen", "users_with_history", "gender=female"}
    assert slices <= set(metrics["slice"])
    assert set(drift["input"]) == {
        "pctr",
        "user_prior_ctr",
        "user_prior_impressions",
        "ad_age_days",
        "category_mix",
        "unseen_ad_share",
    }
    client = MlflowClient()
    run_id = client.get_model_version(settings.tracking.registered_model, "1").run_id
    steps = [m.step for m in client.get_metric_history(run_id, "monitor.overall.auc")]
    assert sorted(steps) == [(d - date(1970, 1, 1)).days for d in (HEALTHY_DAY, SHIFTED_DAY)]

    # a second run finds nothing new to monitor; a healthy day alone raises nothing
    assert monitor(overrides=served)["days"] == []
    again = monitor(run_date=HEALTHY_DAY, overrides=served, return_state=True)
    assert again.name == "Completed" and again.result()["degraded"] == {}


def test_the_automation_that_retrains_on_degradation_is_defined_on_the_retrain_deployment():
    spec = yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())
    by_entrypoint = {d["entrypoint"]: d for d in spec["deployments"]}
    assert "flows/monitor.py:monitor" in by_entrypoint
    triggers = [DeploymentEventTrigger(**t) for t in by_entrypoint["flows/retrain.py:retrain"]["triggers"]]
    assert [t.expect for t in triggers] == [{DEGRADED_EVENT}]
    assert triggers[0].enabled and triggers[0].match.model_dump() == {"prefect.resource.id": "adrank.model.*"}
