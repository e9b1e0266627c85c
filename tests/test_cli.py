import json

import pytest

from flows.cli import COMMANDS, DEMO_SCALE, main
from tasks.config import load_settings


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


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_and_exits_0(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: adrank {command}") and COMMANDS[command] in out
    assert "--training.epochs" in out  # the config flags follow


@pytest.mark.parametrize(
    "argv",
    [
        ["promote"],
        ["promote", "--training.epochs", "2"],
        ["stack"],
        ["stack", "sideways"],
        ["rankings"],
        ["explain", "--user", "u1"],
        ["rankings", "--user"],
        ["config", "--no-such.flag", "1"],
    ],
)
def test_bad_usage_exits_2_with_the_usage_line(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADRANK_HOME", str(tmp_path))
    assert main(argv) == 2
    assert f"adrank {argv[0]}" in capsys.readouterr().err


def test_the_demo_runs_at_its_own_scale_unless_full(tmp_path, monkeypatch):
    from flows.cli import command_arguments, merge

    args, flags = command_arguments("demo", ["--full", "--training.epochs", "3"])
    assert args == {"full": True} and flags == ["--training.epochs", "3"]
    demo = load_settings(merge(DEMO_SCALE, {"training": {"epochs": 3}}))
    assert demo.training.epochs == 3 and demo.training.sample_pairs == DEMO_SCALE["training"]["sample_pairs"]
    assert demo.ranking.candidates_k == DEMO_SCALE["ranking"]["candidates_k"]


def test_a_bad_flag_value_names_the_field(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADRANK_HOME", str(tmp_path))
    assert main(["config", "--training.batch_size", "zero"]) == 2
    assert "training.batch_size" in capsys.readouterr().err


def test_broken_logs_are_reported_without_a_traceback(prefect_api, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADRANK_HOME", str(tmp_path))
    (tmp_path / "logs" / "ads").mkdir(parents=True)
    assert main(["retrain", "--data.logs", str(tmp_path / "logs")]) == 1
    assert "no Parquet files for table 'impressions'" in capsys.readouterr().err


def test_the_demo_summary_says_which_gate_held_a_version_and_what_step_0_serves():
    from flows.cli import kept_step_line, promotion_line

    gates = [
        {"name": "popularity", "passed": False, "detail": "vs popularity: worse beyond the noise on gauc (overall)"},
        {"name": "smoke", "passed": True, "detail": "scores the fixed examples"},
    ]
    held = promotion_line({"promoted": False, "gates": gates})
    assert held == "not promoted, held by the popularity gate (vs popularity: worse beyond the noise on gauc (overall))"
    assert promotion_line({"promoted": True, "gates": gates}).startswith("promoted to champion")
    assert "without the fine-tuned logit" in kept_step_line(0) and kept_step_line(400).startswith("kept step 400")


@pytest.mark.fault
def test_sample_data_never_replaces_logs_it_did_not_write(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADRANK_HOME", str(tmp_path / "home"))
    real = tmp_path / "real-logs"
    (real / "impressions").mkdir(parents=True)
    (real / "impressions" / "part-0.parquet").write_bytes(b"the only copy of last year's clicks")
    small = ["--sample.users", "5", "--sample.ads", "4", "--sample.days", "3"]
    assert main(["sample-data", "--data.logs", str(real), *small]) == 1
    assert str(real) in capsys.readouterr().err
    assert (real / "impressions" / "part-0.parquet").read_bytes() == b"the only copy of last year's clicks"
    # a folder sample-data wrote may be rewritten, wherever it is; so may the default one without a marker
    written = tmp_path / "elsewhere"
    assert main(["sample-data", "--data.logs", str(written), *small]) == 0
    assert main(["sample-data", "--data.logs", str(written), "--sample.seed", "7", *small]) == 0
    default = tmp_path / "home" / "sample_logs"
    (default / "ads").mkdir(parents=True)
    assert main(["sample-data", *small]) == 0
    assert (default / "ads" / "part-0.parquet").exists()
    assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path / "home").glob(".*.tmp"))
