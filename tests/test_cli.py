import json

from flows.cli import main


def test_config_prints_the_resolved_config_with_flags_over_env(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADRANK_HOME", str(tmp_path))
    monkeypatch.setenv("ADRANK_TRAINING__EPOCHS", "5")
    assert main(["config", "--training.epochs", "3", "--ranking.top_n", "7"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["training"]["epochs"] == 3 and config["ranking"]["top_n"] == 7
    assert config["warehouse"] == str(tmp_path / "warehouse.duckdb")


def test_sample_data_writes_the_logs_under_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADRANK_HOME", str(tmp_path))
    assert main(["sample-data", "--sample.users", "5", "--sample.ads", "4", "--sample.days", "3"]) == 0
    assert "sample logs written" in capsys.readouterr().out
    assert (tmp_path / "sample_logs" / "ads" / "part-0.parquet").exists()


def test_usage_and_unknown_commands(capsys):
    assert main([]) == 0
    assert "adrank <command>" in capsys.readouterr().out
    assert main(["train-everything"]) == 2


def test_a_bad_flag_value_names_the_field(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADRANK_HOME", str(tmp_path))
    assert main(["config", "--training.batch_size", "zero"]) == 2
    assert "training.batch_size" in capsys.readouterr().err


def test_broken_logs_are_reported_without_a_traceback(prefect_api, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADRANK_HOME", str(tmp_path))
    (tmp_path / "logs" / "ads").mkdir(parents=True)
    assert main(["retrain", "--data.logs", str(tmp_path / "logs")]) == 1
    assert "no Parquet files for table 'impressions'" in capsys.readouterr().err
