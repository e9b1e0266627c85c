"""The README's commands and CI stay in sync; state never gets tracked."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    quick_start = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick_start)


def test_ci_runs_exactly_the_readme_test_command():
    setup_and_demo, setup_and_test = readme_commands()[:2]
    assert setup_and_demo.endswith("adrank demo")
    assert "torch==2.13.0" in setup_and_demo and "torch==2.13.0" in setup_and_test
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert ci_lines[-1] == setup_and_test


def test_state_and_data_are_ignored_by_git():
    for path in ("adrank_home/warehouse.duckdb", "x/mlflow.db", "p/train.parquet", "m/model.safetensors", ".venv/x"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert ignored.returncode == 0, f"{path} is not ignored"
