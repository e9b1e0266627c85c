"""The README's pictures, from a real `adrank demo` run on the local stack, taken with headless Chromium.

    apt-get install chromium            # Debian's package; no browser download at run time
    .venv/bin/python docs/screenshots/capture.py [--home /tmp/adrank-screens]

Starts `adrank stack up` on spare ports under --home, runs `adrank demo` against it (flows on the stack's
Prefect server, models in its MLflow server), screenshots the retrain flow-run page in Prefect's UI and
the retrain run page in MLflow's UI, copies the run's reliability diagram, then `adrank stack down`.
Writes prefect_flow_run.png, mlflow_run.png, mlflow_run_plots.png and reliability_diagram.png here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ADRANK = str(Path(sys.executable).with_name("adrank"))
PREFECT_PORT, MLFLOW_PORT = 4300, 5300  # not the stack's defaults, so a running stack is left alone
WINDOW = "1440,1000"
RENDER_BUDGET_MS = 20000  # virtual time for the single-page apps to fetch and draw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path("/tmp/adrank-screens"))
    home = parser.parse_args().home.resolve()
    shutil.rmtree(home, ignore_errors=True)
    env = os.environ | {
        "ADRANK_HOME": str(home),
        "ADRANK_STACK__PREFECT_PORT": str(PREFECT_PORT),
        "ADRANK_STACK__MLFLOW_PORT": str(MLFLOW_PORT),
    }
    subprocess.run([ADRANK, "stack", "up"], env=env, check=True)
    try:
        on_stack = env | {
            "PREFECT_API_URL": f"http://127.0.0.1:{PREFECT_PORT}/api",
            "ADRANK_TRACKING__MLFLOW_URI": f"http://127.0.0.1:{MLFLOW_PORT}",
        }
        subprocess.run([ADRANK, "demo"], env=on_stack, check=True)
        flow_run_id, experiment_id, run_id = latest_retrain(on_stack)
        mlflow_run = f"http://127.0.0.1:{MLFLOW_PORT}/#/experiments/{experiment_id}/runs/{run_id}"
        screenshot(f"http://127.0.0.1:{PREFECT_PORT}/runs/flow-run/{flow_run_id}", HERE / "prefect_flow_run.png")
        screenshot(mlflow_run, HERE / "mlflow_run.png")
        screenshot(f"{mlflow_run}/artifacts/plots/roc_curve.png", HERE / "mlflow_run_plots.png")
        download_plot(on_stack, run_id, "plots/reliability_diagram.png", HERE / "reliability_diagram.png")
    finally:
        subprocess.run([ADRANK, "stack", "down"], env=env, check=False)
    print(f"pictures in {HERE}")


def latest_retrain(env: dict) -> tuple[str, str, str]:
    """The newest retrain flow run's id (Prefect) and its MLflow experiment and run ids."""
    code = """
import mlflow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
done = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED])))
with get_client(sync_client=True) as client:  # the deployments' scheduled runs are newer: completed ones only
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])),
                                 flow_run_filter=done, sort=FlowRunSort.START_TIME_DESC, limit=1)
run = mlflow.search_runs(
    experiment_names=["adrank"], order_by=["start_time DESC"], max_results=1, output_format="list")[0]
print(runs[0].id, run.info.experiment_id, run.info.run_id)
"""
    env = env | {"MLFLOW_TRACKING_URI": env["ADRANK_TRACKING__MLFLOW_URI"]}
    found = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    flow_run_id, experiment_id, run_id = found.stdout.split()
    return flow_run_id, experiment_id, run_id


def screenshot(url: str, out: Path) -> None:
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",  # root in a container
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={WINDOW}",
            f"--virtual-time-budget={RENDER_BUDGET_MS}",
            f"--screenshot={out}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    print(f"{out.name}: {url}")


def download_plot(env: dict, run_id: str, artifact: str, out: Path) -> None:
    code = f"import mlflow, shutil; shutil.copy(mlflow.artifacts.download_artifacts(run_id='{run_id}', "
    code += f"artifact_path='{artifact}'), '{out}')"
    env = env | {"MLFLOW_TRACKING_URI": env["ADRANK_TRACKING__MLFLOW_URI"]}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


if __name__ == "__main__":
    main()
