"""The registered model serves anywhere its pinned requirements are installed: a fresh virtualenv without
adrank runs `mlflow models serve -m models:/adrank-ctr@champion`, and /invocations answers with the pCTR
that rerank published, for the same pairs and features."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import duckdb
import mlflow
import numpy as np
import polars as pl
import pytest

from flows.rerank import rerank
from flows.retrain import retrain
from tasks.output_layer import PRIOR_COLUMNS
from tasks.pairs import build_ranking_inputs
from tasks.registry import configure_tracking, serving_requirements
from tests.conftest import build_settings

SERVER_START_TIMEOUT_S = 300
SIGNAL_TRAINING = {"epochs": 2, "batch_size": 16, "learning_rate": 2e-3, "warmup_ratio": 0.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranked(prefect_api, tmp_path_factory, tiny_model_dir, signal_logs):
    home = tmp_path_factory.mktemp("serving") / "home"
    settings = build_settings(
        home, tiny_model_dir, signal_logs, training=SIGNAL_TRAINING, promotion={"max_ece": 1.0, "max_logloss_gap": 1.0}
    )
    overrides = settings.model_dump(mode="json") | {"ranking": {"top_n": 3, "active_window_days": 3}}
    trained = retrain(overrides)
    assert trained["promoted"], trained["reason"]
    summary = rerank(overrides=overrides)
    return build_settings(home, tiny_model_dir, signal_logs, ranking={"run_date": summary["run_date"]}), summary


@pytest.fixture(scope="module")
def serving_env(tmp_path_factory, ranked) -> Path:
    """A virtualenv with only the model's requirements.txt installed (pip, from the package registries)."""
    settings, _ = ranked
    configure_tracking(settings)
    requirements = mlflow.pyfunc.get_model_dependencies(f"models:/{settings.tracking.registered_model}@champion")
    assert sorted(Path(requirements).read_text().split()) == sorted(serving_requirements())
    env = tmp_path_factory.mktemp("serve-env") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    subprocess.run(
        [str(env / "bin" / "pip"), "install", "--quiet", "-r", requirements], check=True, cwd=env.parent, timeout=1200
    )
    no_adrank = subprocess.run([str(env / "bin" / "python"), "-c", "import tasks"], cwd=env.parent, capture_output=True)
    assert no_adrank.returncode != 0, "adrank's tasks package must not be importable in the serving env"
    return env


def published_requests(settings) -> tuple[pl.DataFrame, np.ndarray]:
    """The published (user, ad) pairs of run_date with the features rerank had, and their published pCTR."""
    inputs = build_ranking_inputs(settings)
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        published = con.execute(
            "select user_id, ad_id, pctr from ad_rankings where run_date = $d order by user_id, rank",
            {"d": settings.ranking.run_date},
        ).pl()
    pairs = published.join(inputs.users, on="user_id").join(inputs.ads, on="ad_id")
    pairs = pairs.select("user_text", "ad_text", "ad_id", *PRIOR_COLUMNS, "pctr")
    return pairs.drop("pctr"), pairs["pctr"].to_numpy()


def invoke(port: int, frame: pl.DataFrame) -> np.ndarray:
    body = json.dumps({"dataframe_split": {"columns": frame.columns, "data": frame.rows()}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    return np.asarray(answer["predictions"], dtype=np.float64).reshape(-1)


@pytest.mark.serving
def test_the_champion_serves_from_a_venv_without_adrank_and_matches_rerank(ranked, serving_env, tmp_path):
    settings, summary = ranked
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"MLFLOW_TRACKING_URI": settings.tracking.mlflow_uri, "PATH": f"{serving_env / 'bin'}:{env['PATH']}"}
    model_uri = f"models:/{settings.tracking.registered_model}@champion"
    command = [str(serving_env / "bin" / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
                time.sleep(1)

        # parity: the served pCTR of every published pair equals the published pCTR, to float32 noise: the
        # server scores the 72 pairs in one request, rerank in its own batches, and on some CPUs the kernels
        # sum in another order by batch shape (CI saw 1.2e-5); another model or other features differ far more
        requests, published = published_requests(settings)
        assert requests.height == summary["rows"]
        np.testing.assert_allclose(invoke(port, requests), published, rtol=0, atol=1e-4)

        # optional inputs may be null per row: null user counts are a user with no history, null ad counts a
        # cold ad (never shown before)
        nulls = requests.head(4).with_columns(
            pl.when(pl.int_range(pl.len()) % 2 == 0).then(None).otherwise(pl.col(c)).alias(c)
            for c in ("ad_id", *PRIOR_COLUMNS)
        )
        spelled_out = requests.head(4).with_columns(
            pl.when(pl.int_range(pl.len()) % 2 == 0).then(0).otherwise(pl.col(c)).alias(c) for c in PRIOR_COLUMNS
        )
        served_nulls = invoke(port, nulls)
        np.testing.assert_allclose(served_nulls[1::2], published[1:4:2], atol=1e-6)  # untouched rows
        np.testing.assert_allclose(served_nulls[0::2], invoke(port, spelled_out)[0::2], atol=1e-6)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()
