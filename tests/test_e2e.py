"""End to end: a real `prefect server` on loopback, `prefect deploy` from deploy/prefect.yaml, process
workers for both work pools, and deployment runs started through the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import duckdb
import pytest

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
SERVER_START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 600


# the server's automations as JSON: the events each expects and the deployments it runs
AUTOMATIONS = """
import asyncio, json
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        found = []
        for automation in await client.read_automations():
            runs = []
            for action in automation.actions:
                deployment = await client.read_deployment(action.deployment_id)
                flow = await client.read_flow(deployment.flow_id)
                runs.append(f"{flow.name}/{deployment.name}")
            found.append({"expect": sorted(automation.trigger.expect), "runs": runs, "enabled": automation.enabled})
        print(json.dumps(found))

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(api_url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.poll() is None, "prefect server exited during start-up"
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"prefect server at {api_url} not healthy after {SERVER_START_TIMEOUT_S} s")


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    done = subprocess.run([PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def prefect_stack(tmp_path, tiny_model_dir, sample_logs):
    """A prefect server and one process worker per work pool; stopped afterwards."""
    api_url = f"http://127.0.0.1:{free_port()}/api"
    env = os.environ | {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "ADRANK_HOME": str(tmp_path / "adrank"),
        "ADRANK_DATA__LOGS": str(sample_logs),
        "ADRANK_MODEL__BASE_MODEL": str(tiny_model_dir),
        "ADRANK_MODEL__MAX_SEQ_LENGTH": "64",
        "ADRANK_TRAINING__BATCH_SIZE": "64",
        # a random tiny model on 60 test pairs: its ECE and logloss gaps are noise; this test is about deployments
        "ADRANK_PROMOTION__MAX_ECE": "0.3",
        "ADRANK_PROMOTION__MAX_LOGLOSS_GAP": "0.3",
    }
    port = api_url.split(":")[2].split("/")[0]
    started: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, *args: str) -> subprocess.Popen:
        out = (logs / f"{name}.log").open("w")
        process = subprocess.Popen(
            [PREFECT, *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        started.append(process)
        return process

    try:
        server = start("server", "server", "start", "--host", "127.0.0.1", "--port", port)
        wait_for_health(api_url, server)
        for pool in ("adrank-cpu", "adrank-gpu"):
            cli(env, "work-pool", "create", pool, "--type", "process")
            start(f"worker-{pool}", "worker", "start", "--pool", pool, "--type", "process")
        yield env, tmp_path
    finally:
        for process in reversed(started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.mark.e2e
def test_deployments_run_through_the_cli(prefect_stack):
    env, tmp_path = prefect_stack
    deployed = cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
    assert "retrain/nightly" in deployed and "rerank/nightly" in deployed

    top_n = {"retrain/nightly": [], "rerank/nightly": ["-p", 'overrides={"ranking": {"top_n": 5}}']}
    for deployment in ("retrain/nightly", "rerank/nightly"):
        out = cli(
            env,
            "deployment",
            "run",
            deployment,
            *top_n[deployment],
            "--watch",
            "--watch-timeout",
            str(RUN_TIMEOUT_S),
            timeout=RUN_TIMEOUT_S + 60,
        )
        assert "Completed" in out, out

    with duckdb.connect(str(tmp_path / "adrank" / "warehouse.duckdb"), read_only=True) as con:
        users, rows, versions, bad_ranks = con.execute(
            "select count(distinct user_id), count(*), list(distinct model_version), "
            "count(*) filter (where rank < 1 or rank > 5) from latest_ad_rankings"
        ).fetchone()
    assert users > 20 and rows == users * 5  # the top_n flow parameter reached the run
    assert versions == ["1"] and bad_ranks == 0

    # the automation that retrains on adrank.model.degraded came with the retrain deployment
    automations = json.loads(
        subprocess.run(
            [sys.executable, "-c", AUTOMATIONS], cwd=REPO, env=env, capture_output=True, text=True, check=True
        ).stdout
    )
    assert [a["expect"] for a in automations] == [["adrank.model.degraded"]], automations
    assert automations[0]["runs"] == ["retrain/nightly"] and automations[0]["enabled"]
    # monitor the day just ranked, once its impressions exist: here, a rerank of the logs' last day
    last_day = {"ranking": {"run_date": "2026-10-10", "top_n": 5}}
    for deployment, parameters in (("rerank/nightly", last_day), ("monitor/nightly", {})):
        out = cli(
            env,
            "deployment",
            "run",
            deployment,
            "-p",
            f"overrides={json.dumps(parameters)}",
            "--watch",
            "--watch-timeout",
            str(RUN_TIMEOUT_S),
            timeout=RUN_TIMEOUT_S + 60,
        )
        assert "Completed" in out or "Degraded" in out, out
    with duckdb.connect(str(tmp_path / "adrank" / "warehouse.duckdb"), read_only=True) as con:
        monitored = con.execute(
            "select run_date::varchar, model_version, impressions from model_daily_metrics where slice = 'overall'"
        ).fetchall()
    assert [(day, version) for day, version, _ in monitored] == [("2026-10-10", "1")] and monitored[0][2] > 20
