"""End to end: `adrank stack up` (a Prefect server, an MLflow server, `prefect deploy` from
deploy/prefect.yaml, process workers for both work pools) on free loopback ports, deployment runs
started through the CLI, then `adrank stack down`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import duckdb
import pytest

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
ADRANK = str(Path(sys.executable).with_name("adrank"))
STACK_TIMEOUT_S = 420  # up: two servers, two workers and `prefect deploy` on a busy 2-core machine
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


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:  # all bound at once: no port twice
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run(command: str, env: dict[str, str], *args: str, timeout: float = 120, expect: int = 0) -> str:
    done = subprocess.run([command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == expect, (
        f"{command} {' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    return run(PREFECT, env, *args, timeout=timeout)


def live_group_members(pgid: int) -> list[int]:
    """Processes of a process group that still run (zombies left unreaped by PID 1 do not)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except OSError:
            continue
        if state != "Z" and int(group) == pgid:
            members.append(int(stat.parent.name))
    return members


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def stack(tmp_path, tiny_model_dir, sample_logs):
    """`adrank stack up` on free ports, its export lines applied to the env; `adrank stack down` afterwards
    whatever happened (a no-op when the test has stopped it)."""
    prefect_port, mlflow_port = free_ports(2)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "ADRANK_TRACKING__MLFLOW_URI")}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "ADRANK_HOME": str(tmp_path / "adrank"),
        "ADRANK_STACK__PREFECT_PORT": str(prefect_port),
        "ADRANK_STACK__MLFLOW_PORT": str(mlflow_port),
        "ADRANK_DATA__LOGS": str(sample_logs),
        "ADRANK_MODEL__BASE_MODEL": str(tiny_model_dir),
        "ADRANK_MODEL__MAX_SEQ_LENGTH": "64",
        "ADRANK_TRAINING__BATCH_SIZE": "64",
        # a random tiny model on 60 test pairs: its ECE and logloss gaps are noise; this test is about deployments
        "ADRANK_PROMOTION__MAX_ECE": "0.3",
        "ADRANK_PROMOTION__MAX_LOGLOSS_GAP": "0.3",
        "ADRANK_PROMOTION__MAX_MEAN_PCTR_ERROR": "1.0",  # 9 validation clicks: the fitted base rate is noise too
    }
    try:
        up = run(ADRANK, env, "stack", "up", timeout=STACK_TIMEOUT_S)
        exports = dict(
            line.removeprefix("export ").split("=", 1) for line in up.splitlines() if line.startswith("export ")
        )
        assert exports["PREFECT_API_URL"] == f"http://127.0.0.1:{prefect_port}/api", up
        assert exports["ADRANK_TRACKING__MLFLOW_URI"] == f"http://127.0.0.1:{mlflow_port}", up
        yield env | exports, tmp_path
    finally:
        subprocess.run([ADRANK, "stack", "down"], cwd=REPO, env=env, timeout=300)


@pytest.mark.e2e
def test_deployments_run_through_the_cli_on_the_local_stack(stack):
    env, tmp_path = stack
    assert "already up" in run(ADRANK, env, "stack", "up")  # idempotent
    assert run(ADRANK, env, "stack", "status").count(" up ") == 4  # two servers, two workers
    deployed = cli(env, "deployment", "ls")
    assert "retrain/nightly" in deployed and "rerank/nightly" in deployed and "monitor/nightly" in deployed

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

    # the flows used the stack's MLflow server, not a store of their own under ADRANK_HOME
    mlflow_uri = env["ADRANK_TRACKING__MLFLOW_URI"]
    alias = f"{mlflow_uri}/api/2.0/mlflow/registered-models/alias?name=adrank-ctr&alias=champion"
    with urllib.request.urlopen(alias, timeout=10) as response:
        assert json.load(response)["model_version"]["version"] == "1"
    assert not (tmp_path / "adrank" / "mlflow.db").exists()

    # down stops every process group it recorded, and nothing listens on the stack's ports any more
    state = json.loads((tmp_path / "adrank" / "stack" / "stack.json").read_text())
    assert len(state["components"]) == 4
    assert "the stack is down" in run(ADRANK, env, "stack", "down")
    assert {c["name"]: live_group_members(c["pid"]) for c in state["components"]} == {
        c["name"]: [] for c in state["components"]
    }
    assert not listening(int(env["ADRANK_STACK__PREFECT_PORT"])) and not listening(
        int(env["ADRANK_STACK__MLFLOW_PORT"])
    )
    assert not (tmp_path / "adrank" / "stack" / "stack.json").exists()
    run(ADRANK, env, "stack", "status", expect=1)
