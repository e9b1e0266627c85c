"""`adrank stack`: the command's parsing and exit codes, and that down signals exactly the recorded process
groups (the servers themselves run in tests/test_e2e.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from flows.cli import main
from tasks import stack
from tasks.config import load_settings


@pytest.fixture
def state(tmp_path):
    """An empty stack state; whatever the test started is killed afterwards."""
    state = {"state_dir": str(tmp_path), "prefect_api_url": "", "mlflow_uri": "", "components": []}
    yield state
    for component in state["components"]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(component["pid"], signal.SIGKILL)


def sleeper(state: dict, name: str) -> dict:
    """A component whose group holds two processes: a shell and its child."""
    component = stack.start_component(state, name, dict(os.environ), ["sh", "-c", "sleep 60 & wait"], pool="-")
    deadline = time.monotonic() + 10
    while len(stack.group_members(component["pid"])) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return component


@pytest.mark.parametrize("argv", [["stack"], ["stack", "restart"], ["stack", "--home", "x"]])
def test_a_missing_or_unknown_action_prints_the_usage(argv, capsys):
    assert main(argv) == 2
    assert "usage: adrank stack up|down|status" in capsys.readouterr().err


def test_without_a_stack_status_fails_and_down_succeeds(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADRANK_HOME", str(tmp_path))
    assert main(["stack", "status"]) == 1
    assert main(["stack", "down"]) == 0
    assert capsys.readouterr().out.count("the stack is not running") == 2


def test_down_stops_every_recorded_group_and_forgets_it(state, tmp_path):
    components = [sleeper(state, "a"), sleeper(state, "b")]
    assert all(len(stack.group_members(c["pid"])) == 2 for c in components)
    stack.stop_stack(state, timeout=5)
    assert [stack.group_members(c["pid"]) for c in components] == [[], []]
    assert not (tmp_path / "stack.json").exists()


def test_status_is_1_when_a_component_died(state, tmp_path, monkeypatch, capsys):
    components = [sleeper(state, "a"), sleeper(state, "b")]
    monkeypatch.setenv("ADRANK_STACK__STATE_DIR", str(tmp_path))
    assert stack.stack_status(load_settings()) == 0
    os.killpg(components[1]["pid"], signal.SIGKILL)
    while stack.group_members(components[1]["pid"]):
        time.sleep(0.05)
    assert stack.stack_status(load_settings()) == 1
    assert "dead" in capsys.readouterr().out


def test_a_pid_that_names_another_process_now_is_never_signalled(state):
    component = sleeper(state, "a")
    component["start_time"] = "1"  # as if the recorded process had exited and its pid been reused
    stack.stop_stack(state, timeout=5)
    assert len(stack.group_members(component["pid"])) == 2
