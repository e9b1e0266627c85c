"""The retrain and rerank flows under a real Prefect API, with a real MLflow store and DuckDB files."""

from __future__ import annotations

import json
import shutil

import duckdb
import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.cli import main
from flows.rerank import rerank
from flows.retrain import retrain
from tasks.explain import explain_pair
from tasks.logs import LogContractError
from tasks.output_layer import PRIOR_COLUMNS, PairPriors
from tasks.pairs import build_ranking_inputs, history_ablations
from tasks.registry import CHALLENGER, CHAMPION, configure_tracking, load_version, smoke_test
from tasks.score import RankingModel
from tests.conftest import SIGNAL_ADS, SIGNAL_DATA, SIGNAL_PROMOTION, SIGNAL_TRAINING, build_settings

# first_retrain (tests/conftest.py): version 1, trained on signal_logs and promoted; shared with test_analysts.py


@pytest.fixture(scope="module")
def worse_retrain(first_retrain, constant_model_dir, signal_logs):
    """Version 2, registered after version 1 through the default path: a text model that says nothing (the
    same logit for every pair, lr 0), so no trained step beats the priors alone and it serves them."""
    settings, _ = first_retrain
    training = {**SIGNAL_TRAINING, "epochs": 1, "learning_rate": 0.0}
    worse = build_settings(
        settings.home, constant_model_dir, signal_logs, training=training, promotion=SIGNAL_PROMOTION
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
    steps = int(run.data.metrics["train_steps"])
    assert [m.step for m in history] == list(range(0, steps + 1, 72))  # 1,152 training pairs, batches of 16
    assert run.data.metrics["stage1.pairs"] > 0 and "stage1.holdout_spearman" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"evaluation.json", "evaluation.md", "config.json", "plots"} <= artifacts
    plots = {a.path: a.file_size for a in client.list_artifacts(result["run_id"], "plots")}
    for plot in ("roc_curve", "reliability_diagram", "pctr_histogram", "metrics_table"):
        assert plots[f"plots/{plot}.png"] > 1000  # a rendered PNG, not an empty file
    losses = client.get_metric_history(result["run_id"], "train_step_loss")
    assert [m.step for m in losses] == list(range(1, steps + 1))  # every optimizer step, a training curve
    assert run.info.run_name.startswith("retrain logs to 2026-05-")

    # the registered version says what it is: data window, rows, base model, code
    version = client.get_model_version(name, "1")
    assert "fine-tuned from" in version.description and "training pairs" in version.description
    assert version.tags["data.until"] == run.data.tags["data.until"]
    assert version.tags["pairs.train_rows"] == "1152" and version.tags["base_model"] == str(settings.model.base_model)
    assert len(version.tags["git_commit"]) == 40 or version.tags["git_commit"] == "unknown"
    gates = json.loads(version.tags["promotion"])["gates"]
    assert [g["name"] for g in gates] == [
        *("popularity", "champion", "trained", "logloss", "calibration", "pctr_spread", "mean_pctr", "smoke")
    ]
    # the text beat the ads' click counts on validation (new ads every day): a trained step serves
    assert run.data.metrics["kept_step"] > 0 and run.data.metrics["selection.text_gain.logloss"] < 0
    # the version stores how its texts were rendered
    model_config = mlflow.pyfunc.load_model(f"models:/{name}/1").model_config
    assert model_config["text_settings"]["data"]["history_length"] == settings.data.history_length


def test_prefect_runs_say_what_and_when_and_show_sample_rankings(first_retrain):
    """Flow-run names carry the date, the retrain summary states each gate, rerank leaves a table artifact."""
    settings, _ = first_retrain
    overrides = settings.model_dump(mode="json") | {"ranking": {"top_n": 3, "active_window_days": 3}}
    state = rerank(overrides=overrides, return_state=True)
    summary, flow_run_id = state.result(), state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).name == f"rerank {summary['run_date']} v1"
        names = {run.name for run in client.read_flow_runs()}
        ours = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        sample = {a.key: a for a in client.read_artifacts(artifact_filter=ours)}["rerank-sample-users"]
        retrain_summaries = [a.data for a in client.read_artifacts() if a.key == "retrain-summary"]
    assert any(n.startswith("retrain logs to 2026-05-") and n.endswith(": v1 promoted") for n in names), names
    assert any("Version 1: promoted to champion" in s and "| smoke | passed |" in s for s in retrain_summaries)
    rows = json.loads(sample.data)
    assert rows and {row["rank"] for row in rows} == {1, 2, 3} and {"user_id", "ad_id", "pctr"} <= set(rows[0])


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
    assert table[("fine_tuned", "overall")] < table[(CHAMPION, "overall")]
    assert result["version"] == "2" and not result["promoted"] and result["kept_step"] == 0
    layer = load_version(settings, "2").unwrap_python_model().calibration
    assert layer.slope == layer.unseen_slope == 0  # registered with logit weight 0
    client = MlflowClient()
    name = settings.tracking.registered_model
    assert client.get_model_version_by_alias(name, CHAMPION).version == 1
    assert client.get_model_version_by_alias(name, CHALLENGER).version == 2
    tags = client.get_run(result["run_id"]).data.tags
    assert "never replaces a champion" in tags["promotion.reason"]
    failed = {gate["name"] for gate in json.loads(tags["promotion.gates"]) if not gate["passed"]}
    assert {"champion", "trained"} <= failed  # the priors alone: not better than version 1, and kept step 0
    assert "smoke" not in failed  # it loads and scores


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
        assert all(row[2].startswith("good") for row in ranked)  # good ads first: by their text and counts
        assert ranked[0][4] >= ranked[1][4] >= ranked[2][4]
    assert {row[5:] for row in first} == {(settings.tracking.registered_model, "1")}

    assert not summary["two_stage"]  # candidates_k (100) >= ads: the exhaustive ranking
    again = rerank(overrides=overrides)
    assert again["run_date"] == summary["run_date"]
    assert rankings(settings) == first  # same rows, no duplicates (scored_at aside)


def test_models_rankings_and_explain_read_what_the_flows_wrote(first_retrain, monkeypatch, capsys):
    settings, _ = first_retrain
    for key, value in (
        ("ADRANK_HOME", settings.home),
        ("ADRANK_TRACKING__MLFLOW_URI", settings.tracking.mlflow_uri),
        ("ADRANK_DATA__LOGS", settings.data.logs),
    ):
        monkeypatch.setenv(key, str(value))
    summary = rerank(overrides=settings.model_dump(mode="json") | {"ranking": {"top_n": 3, "active_window_days": 3}})
    published = [row for row in rankings(settings) if row[0].isoformat() == summary["run_date"]]
    user = published[0][1]
    capsys.readouterr()

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "champion" in out and "version 1 gates: popularity ok" in out
    assert "champion history (oldest first): 1" in out

    assert main(["rankings", "--user", user, "--date", summary["run_date"]]) == 0
    out = capsys.readouterr().out
    shown = [line.split("┆")[1].strip() for line in out.splitlines() if "┆" in line and "rank" not in line]
    assert shown == [row[2] for row in published if row[1] == user]  # the published ads, best first
    assert main(["rankings", "--user", "nobody"]) == 1
    assert main(["rankings"]) == 2  # --user is required
    capsys.readouterr()

    assert main(["explain", "--user", user, "--ad", "good1", "--date", summary["run_date"]]) == 0
    out = capsys.readouterr().out
    assert "user text" in out and "ad_prior" in out and "left out in turn" in out
    assert main(["explain", "--user", user, "--ad", "no-such-ad"]) == 1


def test_explain_shows_how_each_history_title_moves_the_score(first_retrain):
    settings, _ = first_retrain
    ranking = {"run_date": "2026-05-10"}
    ranked = build_settings(
        settings.home, settings.model.base_model, settings.data.logs, data=SIGNAL_DATA, ranking=ranking
    )
    served = load_version(settings, "1")
    model, checked = RankingModel.from_pyfunc(served), 0
    for user in ("u1", "u2", "u3"):
        explanation = explain_pair(ranked, model, user, "good1")
        assert sum(explanation.log_odds.values()) == pytest.approx(np.log(explanation.pctr / (1 - explanation.pctr)))
        _, rows = history_ablations(ranked, user, "good1")
        full = rows.row(0, named=True)
        prefix, history = explanation.user_text.split("Recently clicked: ")
        for row in explanation.left_out.iter_rows(named=True):
            # the pair scored by the registered model as a user would, with that title cut from the text
            rest = [title for title in history.split(" | ") if title != row["left_out_text"]]
            user_text = f"{prefix}Recently clicked: {' | '.join(rest) or 'nothing yet'}"
            request = pd.DataFrame([full | {"user_text": user_text}])
            counts = dict.fromkeys(PRIOR_COLUMNS, float)  # the signature's types
            request = (
                request[["user_text", "ad_text", "ad_id", *counts]]
                .astype(counts)
                .assign(shown_ad_texts=[full["shown_ad_texts"]], shown_clicked=[full["shown_clicked"]])
            )
            without = float(np.asarray(served.predict(request)).reshape(-1)[0])
            assert without == pytest.approx(row["pctr"], abs=1e-6)
            assert np.sign(without - explanation.pctr) == np.sign(row["pctr_change"])
            checked += abs(row["pctr_change"]) > 1e-6
    assert checked > 0, "no history title moved the score"


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
    dumped = settings.model_dump(mode="json")
    overrides = dumped | {"data": dumped["data"] | {"logs": str(broken)}}
    with pytest.raises(LogContractError, match=r"impressions.*cannot read Parquet"):
        rerank(overrides=overrides)
    assert rankings(settings) == before


def test_manual_promotion_and_rollback_are_one_command_each(first_retrain, worse_retrain, monkeypatch, capsys):
    settings, _ = first_retrain
    assert worse_retrain["version"] == "2"
    for key, value in (
        ("ADRANK_HOME", settings.home),
        ("ADRANK_TRACKING__MLFLOW_URI", settings.tracking.mlflow_uri),
        ("ADRANK_DATA__LOGS", settings.data.logs),
    ):
        monkeypatch.setenv(key, str(value))
    client, name = MlflowClient(), settings.tracking.registered_model
    ranked = rerank(overrides=settings.model_dump(mode="json") | {"ranking": {"top_n": 2}})  # by version 1
    user = next(row[1] for row in rankings(settings) if row[0].isoformat() == ranked["run_date"])
    assert main(["promote", "2"]) == 0
    assert client.get_model_version_by_alias(name, CHAMPION).version == 2
    assert "manual promotion" in client.get_model_version(name, "2").tags["champion_since"]
    capsys.readouterr()
    # a published date is explained by the version that ranked it; otherwise by the champion
    assert main(["explain", "--user", user, "--ad", "good1", "--date", ranked["run_date"]]) == 0
    assert f"model version 1 (the version that ranked {ranked['run_date']})" in capsys.readouterr().out
    assert main(["explain", "--user", user, "--ad", "good1"]) == 0
    assert "model version 2 (the current champion)" in capsys.readouterr().out
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
    assert "not compared: champion version 1 cannot be loaded" in json.loads(tags["promotion.gates"])[1]["detail"]
    assert tags["data.until"] == "2026-05-10T23:50:00"  # the last impression of the logs


def test_each_version_renders_its_inputs_with_the_text_settings_it_was_trained_with(first_retrain, caplog):
    settings, _ = first_retrain
    ranking = {"top_n": 3, "run_date": "2026-05-10"}
    rerank(overrides=settings.model_dump(mode="json") | {"ranking": ranking})
    as_trained = [row for row in rankings(settings) if row[0].isoformat() == ranking["run_date"]]
    caplog.clear()
    data = settings.model_dump(mode="json")["data"] | {"history_length": 1, "history_item_template": "{description}"}
    rerank(overrides=settings.model_dump(mode="json") | {"ranking": ranking, "data": data})
    out = caplog.text  # the flow's prints go to its log (log_prints)
    assert "version 1 renders its inputs with the text settings it was trained with" in out
    assert "data.history_length 1 -> 3" in out and "data.history_item_template '{description}' -> '{title}'" in out
    again = [row for row in rankings(settings) if row[0].isoformat() == ranking["run_date"]]
    assert again == as_trained  # the version's settings, not the run's


def test_a_version_without_stored_text_settings_renders_with_the_runs_config(first_retrain, monkeypatch, capsys):
    from tasks import registry

    settings, result = first_retrain
    monkeypatch.setattr(registry, "text_settings", lambda _: None)  # as adrank registered before storing them
    run_id = registry.start_run(settings, "registered without text settings")
    version = registry.register_model(settings, run_id, settings.checkpoints_dir / result["run_id"])
    capsys.readouterr()
    assert registry.served_settings(settings, version) is settings
    assert f"version {version} stores no text settings" in capsys.readouterr().out


def test_an_ad_first_shown_in_validation_is_served_with_its_counts(first_retrain):
    """Priors as of serving: the version's output layer reads each ad's counts before the ranked day, so an
    ad first shown in the validation window (good9, 2026-05-09) is warm at rerank, not a cold ad."""
    settings, _ = first_retrain
    served = RankingModel.from_pyfunc(load_version(settings, "1"))
    inputs = build_ranking_inputs(settings)  # the day after the logs: 2026-05-11
    ad = inputs.ads.filter(pl.col("ad_id") == "good9")
    assert ad["ad_prior_impressions"][0] > 0 and ad["ad_prior_clicks"][0] > 0
    assert not served.calibration.is_cold(PairPriors.of(ad))[0]
    cold = ad.with_columns(ad_prior_impressions=pl.lit(0), ad_prior_clicks=pl.lit(0))
    assert served.calibration.ad_prior(PairPriors.of(ad))[0] != served.calibration.ad_prior(PairPriors.of(cold))[0]


def test_a_retrain_with_new_text_settings_scores_the_champion_on_its_own_texts(first_retrain, worse_retrain):
    """The champion (version 1, a history of 3 titles) is compared on the same test impressions, rendered as
    it was trained, whatever text settings the challenger uses: its test figures do not move."""
    settings, _ = first_retrain
    shorter = build_settings(
        settings.home,
        settings.model.base_model,
        settings.data.logs,
        data={"history_length": 1},
        training=SIGNAL_TRAINING,
        promotion=SIGNAL_PROMOTION,
    )
    assert MlflowClient().get_model_version_by_alias(settings.tracking.registered_model, CHAMPION).version == 1
    result = retrain(shorter.model_dump(mode="json"))
    champion = {r["slice"]: r for r in result["evaluation"] if r["model"] == CHAMPION}
    as_before = {r["slice"]: r for r in worse_retrain["evaluation"] if r["model"] == CHAMPION}
    for metric in ("auc", "gauc", "logloss"):
        assert champion["overall"][metric] == pytest.approx(as_before["overall"][metric], abs=1e-9), metric
    rebuilt = pl.read_parquet(settings.pairs_dir / "as-trained" / "test.parquet")
    assert rebuilt["user_text"].str.count_matches(r" \| ").max() == 2  # three titles, as version 1 reads them
