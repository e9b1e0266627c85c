import json
from datetime import date
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.config import cli_overrides, flat_params, load_settings, packaged_model_path, redact


def test_defaults_live_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ADRANK_HOME", str(tmp_path / "state"))
    settings = load_settings()
    assert settings.home == tmp_path / "state"
    assert settings.data.logs == str(tmp_path / "state" / "sample_logs")
    assert settings.warehouse == tmp_path / "state" / "warehouse.duckdb"
    assert settings.tracking.mlflow_uri == f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"
    assert settings.model.base_model == packaged_model_path()
    assert (Path(settings.model.base_model) / "model.safetensors").exists()


def test_precedence_defaults_env_overrides_cli(monkeypatch):
    monkeypatch.setenv("ADRANK_TRAINING__EPOCHS", "3")
    monkeypatch.setenv("ADRANK_TRAINING__BATCH_SIZE", "8")
    flags = cli_overrides(["--training.learning_rate", "0.001", "--ranking.run_date", "2026-01-02"])
    assert flags == {"training": {"learning_rate": "0.001"}, "ranking": {"run_date": "2026-01-02"}}  # no env values
    settings = load_settings({"training": {"batch_size": 4, **flags["training"]}, "ranking": flags["ranking"]})
    assert settings.training.epochs == 3  # env
    assert settings.training.batch_size == 4  # override beats env; nested dicts merge
    assert settings.training.learning_rate == 0.001  # CLI flag
    assert settings.training.weight_decay == 0.01  # default kept
    assert settings.ranking.run_date == date(2026, 1, 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"training": {"batch_size": 0}}, "batch_size"),
        ({"data": {"test_fraction": 0.7}}, "test_fraction"),
        ({"data": {"ad_template": "{title; drop table ads}"}}, "not a plain column name"),
        ({"tracking": {"registered_model": "x; drop"}}, "registered_model"),
        ({"no_such_section": {}}, "no_such_section"),
        (
            {"training": {"user_prior_offset": True}, "model": {"calibration": "platt+ad_prior"}},
            r"training.user_prior_offset = true needs model.calibration with user_prior",
        ),
        ({"training": {"ad_prior_offset": True}, "model": {"calibration": "platt"}}, "ad_prior_offset"),
        (
            {"model": {"calibration": "platt+match+affinity+ad_prior+user_prior"}},
            r"set data.shown_history_length > 0",
        ),
    ],
)
def test_invalid_values_are_rejected_with_the_field_name(overrides, message):
    with pytest.raises(ValidationError, match=message):
        load_settings(overrides)


def test_flat_params_cover_every_field():
    params = flat_params(load_settings({"home": "/tmp/x"}))
    assert params["training.learning_rate"] == "0.0001"
    assert params["ranking.top_n"] == "50"
    assert all("." in key or key in ("home", "warehouse", "warehouse_tables") for key in params)


def test_credentials_in_uris_never_reach_tracked_params():
    params = flat_params(load_settings({"tracking": {"mlflow_uri": "https://alice:s3cret@mlflow.example:5000"}}))
    assert params["tracking.mlflow_uri"] == "https://***@mlflow.example:5000"
    assert "s3cret" not in json.dumps(params)


@pytest.mark.fault
@pytest.mark.parametrize(
    "overrides",
    [
        {"ranking": {"candidates_table": "x; DROP TABLE ad_rankings"}},
        {"tracking": {"registered_model": "x'; DROP TABLE ad_rankings; --"}},
        {"data": {"user_template": "{profile}{x; DROP TABLE ad_rankings}"}},
        {"ranking": {"candidates_k": 10, "top_n": 50}},  # K below top_n: not an injection, still refused early
    ],
)
def test_config_values_that_could_reach_sql_or_names_are_rejected(overrides):
    with pytest.raises(ValidationError):
        load_settings(overrides)


@pytest.mark.fault
def test_the_user_id_salt_is_a_secret_that_never_reaches_params(monkeypatch):
    monkeypatch.setenv("ADRANK_RANKING__USER_ID_SALT", "pepper-123")
    settings = load_settings()
    assert settings.ranking.user_id_salt.get_secret_value() == "pepper-123"
    assert "pepper-123" not in str(flat_params(settings)) and "pepper-123" not in settings.model_dump_json()
    # a dumped config passed back as overrides (a flow parameter), or the salt as a flag: refused, naming the env var
    with pytest.raises(ValueError, match="ADRANK_RANKING__USER_ID_SALT"):
        load_settings(settings.model_dump(mode="json"))
    with pytest.raises(ValueError, match="Prefect stores parameters in clear"):
        load_settings({"ranking": {"user_id_salt": "pepper-123"}})


def test_secrets_in_uri_query_parameters_are_redacted():
    uri = "https://user:pw@host/api?token=t0k&region=eu&sig=AbC%3D&X-Amz-Signature=ff00&password=hunter2"
    assert redact(uri) == "https://***@host/api?token=***&region=eu&sig=***&X-Amz-Signature=***&password=***"
    settings = load_settings({"tracking": {"mlflow_uri": "https://mlflow.internal/?access_token=t0k"}})
    assert "t0k" not in str(flat_params(settings))


def test_a_versions_text_settings_replace_the_runs_and_say_what_differs():
    from tasks.config import text_settings, with_text_settings

    run = load_settings({"data": {"history_length": 5}, "training": {"epochs": 7}})
    stored = text_settings(load_settings())  # a version trained with the defaults
    served, changed = with_text_settings(run, stored)
    assert served.data.history_length == 3 and served.training.epochs == 7  # only text settings move
    assert changed == ["data.history_length 5 -> 3"]
    assert with_text_settings(served, stored) == (served, [])
    newer = stored | {"data": stored["data"] | {"a_setting_of_a_newer_adrank": 1}}
    assert with_text_settings(run, newer)[0].data.history_length == 3  # unknown names are ignored
