"""MLflow tracking-server outages during retrain, against a real `mlflow server` on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from mlflow import MlflowClient

from flows.retrain import retrain
from tasks.registry import TrackingUnavailable
from tests.conftest import build_settings

TRAINING = {"epochs": 2, "batch_size": 16, "learning_rate": 2e-3, "warmup_ratio": 0.0}
PROMOTION = {"max_ece": 0.1}  # 72 test pairs: ECE noise is about +-0.05 (tests/test_flows.py)


class MlflowServer:
    def __init__(self, folder):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.folder, self.process = folder, None

    def start(self) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}"]
        command += ["--artifacts-destination", str(self.folder / "artifacts")]
        log = open(self.folder / "server.log", "a")  # noqa: SIM115 - the server process owns it
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=1).status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"mlflow server did not start: {(self.folder / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)  # the server and its workers, as a crash would
        self.process.wait()


@pytest.fixture
def server(tmp_path):
    running = MlflowServer(tmp_path)
    running.start()
    yield running
    if running.process.poll() is None:
        running.stop()


def outage_once_training_starts(
    settings, server: MlflowServer, seconds: float | None, events: list
) -> threading.Thread:
    """Kill the server when fine-tuning begins; bring it back after `seconds` (None: never)."""

    def run() -> None:
        while not settings.checkpoints_dir.exists():
            time.sleep(0.05)
        server.stop()
        events.append("down")
        if seconds is not None:
            time.sleep(seconds)
            server.start()
            events.append("up")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.fault
def test_a_tracking_server_down_for_seconds_does_not_fail_the_retrain(
    prefect_api, tmp_path, tiny_model_dir, signal_logs, server
):
    tracking = {"mlflow_uri": server.uri, "retry_delays_seconds": [1, 2, 4]}
    settings = build_settings(
        tmp_path / "home", tiny_model_dir, signal_logs, training=TRAINING, tracking=tracking, promotion=PROMOTION
    )
    events: list[str] = []
    thread = outage_once_training_starts(settings, server, seconds=3, events=events)
    result = retrain(settings.model_dump(mode="json"))
    thread.join(timeout=120)
    assert events == ["down", "up"]
    assert result["version"] == "1" and result["promoted"], result["reason"]
    versions = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri).search_model_versions()
    assert [v.version for v in versions] == ["1"]  # retries registered nothing twice


@pytest.mark.fault
def test_a_persistent_outage_fails_the_retrain_clearly_and_registers_nothing(
    prefect_api, tmp_path, tiny_model_dir, signal_logs, server, monkeypatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast: the flow's own retries still run
    tracking = {"mlflow_uri": server.uri, "retry_delays_seconds": [0.5, 0.5]}
    settings = build_settings(
        tmp_path / "home", tiny_model_dir, signal_logs, training=TRAINING, tracking=tracking, promotion=PROMOTION
    )
    events: list[str] = []
    outage_once_training_starts(settings, server, seconds=None, events=events)
    with pytest.raises(TrackingUnavailable, match=rf"MLflow tracking server {server.uri} is unreachable"):
        retrain(settings.model_dump(mode="json"))
    assert events == ["down"]
    server.start()
    client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    assert client.search_model_versions() == []
