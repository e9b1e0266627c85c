"""Every analysis in sql/analyses/ against a warehouse the real flows wrote, moved and opened from elsewhere,
and docs/analysts.md holding each one's SQL verbatim."""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path

import duckdb
import polars as pl
import pytest

from flows.cli import main
from flows.monitor import monitor
from flows.rerank import rerank
from tasks.registry import snapshot_model_versions
from tasks.warehouse import VIEWS
from tests.conftest import build_settings

REPO = Path(__file__).resolve().parents[1]
ANALYSES = sorted((REPO / "sql" / "analyses").glob("*.sql"))
RANKED_DAYS = (date(2026, 5, 9), date(2026, 5, 10))  # the last two days of signal_logs
# each analysis -> the columns it returns
COLUMNS = {
    "daily_ctr_trend": ["impression_date", "ads_shown", "impressions", "clicks", "ctr"],
    "input_drift_watch": ["run_date", "model_version", "input", "psi", "value", "shift"],
    "model_versions_overview": [
        "model_name",
        "model_version",
        "is_champion",
        "aliases",
        "created_at",
        "data_from_at",
        "data_until_at",
        "test_auc",
        "test_logloss",
        "test_ece",
        "cold_start_auc",
        "is_promoted",
        "promotion_reason",
        "became_champion_at",
        "became_champion_reason",
    ],
    "monitor_overview": [
        "run_date",
        "model_version",
        "slice",
        "impressions",
        "clicks",
        "ctr",
        "auc",
        "gauc",
        "normalized_entropy",
        "calibration_ratio",
        "top_n_coverage",
        "ctr_in_top_n",
        "ctr_outside_top_n",
    ],
    "offline_vs_online_auc": [
        "run_date",
        "model_version",
        "users",
        "offline_test_auc",
        "impressions",
        "online_auc",
        "calibration_ratio",
    ],
    "predicted_vs_observed_ctr": [
        "run_date",
        "ad_id",
        "model_version",
        "users_ranked",
        "mean_pctr",
        "impressions",
        "clicks",
        "observed_ctr",
    ],
    "top_ctr_ads_last_7_days": ["ad_id", "advertiser", "category", "impressions", "clicks", "ctr"],
    "top_ranked_ads": ["run_date", "ad_id", "users_ranked_first", "users_in_top_n", "mean_pctr"],
}


@pytest.fixture(scope="module")
def moved_warehouse(first_retrain, tmp_path_factory) -> Path:
    """first_retrain's registry in a new home, ranked for the last two days of its logs and monitored by
    the real flows, then moved to another folder (its old path gone): the warehouse an analyst opens."""
    settings, _ = first_retrain
    home = tmp_path_factory.mktemp("analysts") / "home"
    home.mkdir()
    # the registry only (its models stay where they are: the store names them by absolute path), so the
    # warehouse holds what this test publishes whatever test_flows.py has added to the shared home
    shutil.copy(settings.home / "mlflow.db", home / "mlflow.db")
    copied = build_settings(home, settings.model.base_model, settings.data.logs)
    snapshot_model_versions(copied)  # as adrank promote / rollback publish it
    overrides = copied.model_dump(mode="json")
    overrides["ranking"] |= {"top_n": 3}
    for day in RANKED_DAYS:
        rerank(run_date=day, overrides=overrides)
    assert [date.fromisoformat(d) for d in monitor(overrides=overrides, return_state=True).result()["days"]] == list(
        RANKED_DAYS
    )
    moved = tmp_path_factory.mktemp("mounted") / "adrank"
    shutil.move(home, moved)
    return moved / "warehouse.duckdb"


@pytest.fixture
def analyst(moved_warehouse, tmp_path, monkeypatch):
    """A read-only connection to the moved warehouse, opened from an unrelated working directory."""
    monkeypatch.chdir(tmp_path)
    with duckdb.connect(str(moved_warehouse), read_only=True) as con:
        yield con


def test_every_view_answers_from_the_moved_warehouse(analyst):
    for view in [view for views in VIEWS.values() for view in views]:
        assert analyst.execute(f"select count(*) from {view}").fetchone()[0] > 0, view
    daily = analyst.execute("select * from ad_daily_ctr").pl()
    assert daily.select("impression_date", "ad_id").is_duplicated().sum() == 0  # two reranks, no day twice
    assert daily["impression_date"].max() == date(2026, 5, 9)  # the days before the latest run_date


@pytest.mark.parametrize("path", ANALYSES, ids=[path.stem for path in ANALYSES])
def test_analysis_returns_its_columns_and_sensible_rows(analyst, path):
    result = analyst.execute(path.read_text()).pl()
    assert result.columns == COLUMNS[path.stem]
    assert result.height > 0
    for column in [c for c in result.columns if c == "ctr" or c.endswith(("_ctr", "_auc", "pctr"))]:
        values = result[column].fill_nan(None).drop_nulls()  # NaN: a monitored slice without impressions
        assert values.is_empty() or values.is_between(0, 1).all(), (column, result)
    if "clicks" in result.columns:
        assert (result["clicks"] <= result["impressions"]).all()


def test_analyses_answer_what_the_flows_did(analyst):
    def run(name: str) -> pl.DataFrame:
        return analyst.execute((REPO / "sql" / "analyses" / f"{name}.sql").read_text()).pl()

    versions = run("model_versions_overview")
    assert versions.filter(pl.col("is_champion"))["model_version"].to_list() == ["1"]
    first = versions.filter(pl.col("model_version") == "1").row(0, named=True)
    assert first["is_promoted"] and "champion" in first["aliases"] and first["test_auc"] > 0.75
    assert first["data_until_at"].isoformat() == "2026-05-10T23:50:00"  # the last impression of its logs
    assert set(run("offline_vs_online_auc").filter(pl.col("online_auc").is_not_null())["run_date"]) >= set(RANKED_DAYS)
    assert set(run("predicted_vs_observed_ctr")["run_date"]) == {RANKED_DAYS[0]}  # the day ranked and counted
    assert set(run("top_ranked_ads")["run_date"]) == {max(RANKED_DAYS)}
    assert run("daily_ctr_trend")["impressions"].sum() == 1440 - 144  # every impression before 2026-05-10


def test_docs_hold_each_analysis_verbatim():
    doc = (REPO / "docs" / "analysts.md").read_text()
    for path in ANALYSES:
        assert path.read_text().strip() in doc, f"docs/analysts.md lacks the SQL of {path.name}, or an old version"
    assert sorted(COLUMNS) == [path.stem for path in ANALYSES]  # a new analysis brings its expectations
    for view in [view for views in VIEWS.values() for view in views]:
        assert f"`{view}`" in doc


def test_a_manual_promotion_publishes_the_registry_again(moved_warehouse, monkeypatch):
    home = moved_warehouse.parent
    for key, value in (("ADRANK_HOME", home), ("ADRANK_TRACKING__MLFLOW_URI", f"sqlite:///{home / 'mlflow.db'}")):
        monkeypatch.setenv(key, str(value))
    assert main(["promote", "1"]) == 0
    with duckdb.connect(str(moved_warehouse), read_only=True) as con:
        reasons = con.execute("select became_champion_reason from model_versions where is_champion").fetchall()
    assert reasons == [("manual promotion (adrank promote)",)]
