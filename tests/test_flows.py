"""The retrain and rerank flows under a real Prefect API, with a real MLflow store and DuckDB files."""

from __future__ import annotations

import json
import shutil

import duckdb
import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from flows.cli import main
from flows.rerank import rerank
from flows.retrain import retrain
from tasks.logs import LogContractError
from tasks.registry import CHALLENGER, CHAMPION, configure_tracking, smoke_test
from tests.conftest import SIGNAL_ADS, build_settings

SIGNAL_TRAINING = {"epochs": 4, "batch_size": 16, "learning_rate": 2e-3, "warmup_ratio": 0.0}
# 72 test pairs: an ECE that noisy (popularity's own is 0.05 there) would make promotion a coin toss
SIGNAL_PROMOTION = {"max_ece": 0.1}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("flows") / "home"


@pytest.fixture(scope="module")
def first_retrain(prefect_api, home, tiny_model_dir, signal_logs):
    settings = build_settings(home, tiny_model_dir, signal_logs, training=SIGNAL_TRAINING, promotion=SIGNAL_PROMOTION)
    return settings, retrain(settings.model_dump(mode="json"))


@pytest.fixture(scope="module")
def worse_retrain(first_retrain, constant_model_dir, signal_logs):
    """Version 2: a useless model (constant text score, no priors), registered after version 1."""
    settings, _ = first_retrain
    # text only: with the ad prior the constant model would rank like popularity
    worse = build_settings(
        settings.home, constant_model_dir, signal_logs, training={"epochs": 0}, model={"calibration": "none"}
    )
    return retrain(worse.model_dump(mode="json"))


def rankings(settings) -> list[tuple]:
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        return con.execute(
            "select run_date, user_id, ad_id, rank, pctr, model_name, model_version from ad_rankings "
            "order by run_date, user_id, rank"
        ).fetchall()


def test_first_retrain_registers_and_promotes(first_retrain):
    settings, result = first_retrain
    assert result["version"] == "1" and result["promoted"], result["reason"]
    configure_tracking(settings)
    client = MlflowClient()
    name = settings.tracking.registered_model
    assert client.get_model_version_by_alias(name, CHAMPION).version == 1
    assert client.get_model_version_by_alias(name, CHALLENGER).version == 1

    run = client.get_run(result["run_id"])
    assert run.data.params["training.learning_rate"] == "0.002"
    assert run.data.tags["promotion.promoted"] == "True"
    auc = run.data.metrics["test.fine_tuned.overall.auc"]
    assert auc > 0.75  # the ad text decides the click in these logs
    assert auc > run.data.metrics["test.popularity.overall.auc"] - 0.05
    history = client.get_metric_history(result["run_id"], "valid_logloss")
    assert [m.step for m in history] == [0, 36, 72, 108, 144]  # 576 training pairs, batches of 16
    assert run.data.metrics["stage1.pairs"] > 0 and "stage1.holdout_spearman" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"evaluation.json", "config.json"} <= artifacts


def test_champion_loads_from_the_registry_and_predicts_ctr(first_retrain):
    settings, _ = first_retrain
    configure_tracking(settings)
    model = mlflow.pyfunc.load_model(f"models:/{settings.tracking.registered_model}@{CHAMPION}")
    frame = pd.DataFrame(
        {
            "user_text": ["age: 30, city: Leeds. Recently clicked: nothing yet"] * 2,
            "ad_text": [
                "Buy trail running shoes now. Free delivery.",
                "Read the quarterly tax report. Forms attached.",
            ],
        }
    )
    pctr = model.predict(frame)
    assert pctr.shape == (2,) and 0 < pctr[1] < pctr[0] < 1


@pytest.mark.fault
def test_worse_model_is_registered_but_not_promoted(first_retrain, worse_retrain):
    settings, _ = first_retrain
    result = worse_retrain
    table = {(r["model"], r["slice"]): r["auc"] for r in result["evaluation"]}
    assert table[("fine_tuned", "overall")] == 0.5 < table[(CHAMPION, "overall")]
    assert result["version"] == "2" and not result["promoted"]
    client = MlflowClient()
    name = settings.tracking.registered_model
    assert client.get_model_version_by_alias(name, CHAMPION).version == 1
    assert client.get_model_version_by_alias(name, CHALLENGER).version == 2
    tags = client.get_run(result["run_id"]).data.tags
    assert "not above champion" in tags["promotion.reason"]
    failed = {gate["name"] for gate in json.loads(tags["promotion.gates"]) if not gate["passed"]}
    assert {"auc", "pctr_spread"} <= failed and "smoke" not in failed  # it loads and scores; it is just useless


@pytest.mark.fault
def test_a_version_that_cannot_be_loaded_fails_the_smoke_gate(first_retrain):
    settings, _ = first_retrain
    assert "loading or scoring failed" in smoke_test(settings, "99")
    assert smoke_test(settings, "1") is None


def test_rerank_writes_rankings_and_a_rerun_changes_nothing(first_retrain):
    settings, _ = first_retrain
    overrides = settings.model_dump(mode="json") | {"ranking": {"top_n": 3, "active_window_days": 3}}
    summary = rerank(overrides=overrides)
    first = rankings(settings)
    assert summary["model_version"] == "1" and summary["ads"] == len(SIGNAL_ADS)
    assert summary["rows"] == len(first) == summary["users"] * 3
    users = {row[1] for row in first}
    assert len(users) == summary["users"] > 10
    for user in users:
        ranked = [row for row in first if row[1] == user]
        assert [row[3] for row in ranked] == [1, 2, 3]
        assert {row[2] for row in ranked[:2]} == {"good1", "good2"}  # the model learned the text signal
        assert ranked[0][4] >= ranked[1][4] >= ranked[2][4]
    assert {row[5:] for row in first} == {(settings.tracking.registered_model, "1")}

    assert not summary["two_stage"]  # candidates_k (100) >= ads: the exhaustive ranking
    again = rerank(overrides=overrides)
    assert again["run_date"] == summary["run_date"]
    assert rankings(settings) == first  # same rows, no duplicates (scored_at aside)


@pytest.mark.fault
def test_bad_logs_fail_the_rerank_before_anything_published_changes(first_retrain, signal_logs, tmp_path):
    settings, _ = first_retrain
    rerank(overrides=settings.model_dump(mode="json"))  # a published ranking that must survive the bad run
    before = rankings(settings)
    assert before
    broken = tmp_path / "logs"
    shutil.copytree(signal_logs, broken)
    part = next((broken / "impressions").glob("*.parquet"))
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # truncated in transfer
    overrides = settings.model_dump(mode="json") | {"data": {"logs": str(broken)}}
    with pytest.raises(LogContractError, match=r"impressions.*cannot read Parquet"):
        rerank(overrides=overrides)
    assert rankings(settings) == before


def test_manual_promotion_and_rollback_are_one_command_each(first_retrain, worse_retrain, monkeypatch, capsys):
    settings, _ = first_retrain
    assert worse_retrain["version"] == "2"
    for key, value in (("ADRANK_HOME", settings.home), ("ADRANK_TRACKING__MLFLOW_URI", settings.tracking.mlflow_uri)):
        monkeypatch.setenv(key, str(value))
    client, name = MlflowClient(), settings.tracking.registered_model
    assert main(["promote", "2"]) == 0
    assert client.get_model_version_by_alias(name, CHAMPION).version == 2
    assert "manual promotion" in client.get_model_version(name, "2").tags["champion_since"]
    assert main(["rollback"]) == 0
    assert client.get_model_version_by_alias(name, CHAMPION).version == 1
    assert "rollback from version 2" in client.get_model_version(name, "1").tags["champion_since"]
    assert "champion -> version 1" in capsys.readouterr().out

    assert main(["rollback"]) == 1  # version 1 was the first champion
    assert main(["promote", "99"]) == 1
    assert "no earlier champion" in capsys.readouterr().err
    assert client.get_model_version_by_alias(name, CHAMPION).version == 1  # failed commands changed nothing


def test_rerank_in_two_stages_with_the_registered_two_tower(first_retrain):
    settings, _ = first_retrain
    k = 3
    ranking = {"top_n": 2, "candidates_k": k, "active_window_days": 3, "run_date": "2026-05-10"}
    summary = rerank(overrides=settings.model_dump(mode="json") | {"ranking": ranking})
    assert summary["two_stage"] and summary["stage2_pairs"] == summary["users"] * k
    published = [row for row in rankings(settings) if row[0].isoformat() == "2026-05-10"]
    assert len(published) == summary["rows"] == summary["users"] * 2


@pytest.mark.fault
def test_a_champion_that_no_longer_loads_never_blocks_a_retrain(prefect_api, tmp_path, tiny_model_dir, signal_logs):
    settings = build_settings(
        tmp_path / "home", tiny_model_dir, signal_logs, training=SIGNAL_TRAINING, promotion=SIGNAL_PROMOTION
    )
    assert retrain(settings.model_dump(mode="json"))["promoted"]
    shutil.rmtree(settings.artifacts_dir)  # version 1's weights are gone (a purged bucket, a bad migration)
    assert "loading or scoring failed" in smoke_test(settings, "1")

    result = retrain(settings.model_dump(mode="json"))
    assert "version 1 cannot be loaded or scored" in result["champion_problem"]
    assert result["version"] == "2" and result["promoted"], result["reason"]
    assert {row["model"] for row in result["evaluation"]} >= {"fine_tuned", "popularity"}
    assert CHAMPION not in {row["model"] for row in result["evaluation"]}
    assert MlflowClient().get_model_version_by_alias(settings.tracking.registered_model, CHAMPION).version == 2
    tags = MlflowClient().get_run(result["run_id"]).data.tags
    assert "not compared: champion version 1 cannot be loaded" in json.loads(tags["promotion.gates"])[0]["detail"]
    assert tags["data.until"] == "2026-05-10T23:40:00"  # the last impression of the logs
