"""`adrank stack up|down|status`: a local Prefect server, MLflow server and one process worker per work pool.

Everything listens on 127.0.0.1 and lives in the state folder (`stack.state_dir`, default <home>/stack):
`stack.json` (what was started: pids, process start times, URLs), `logs/<component>.log`, the Prefect
server's database (`prefect/`) and the MLflow store (`mlflow.db`, `mlartifacts/`). Each component runs
in its own process group; `down` signals only the groups recorded in `stack.json`, and only while the
recorded pid still names the process that was started (its start time in /proc matches: Linux only).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import yaml

from tasks.config import Settings

ACTIONS = ("up", "down", "status")
REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = Path("deploy/prefect.yaml")  # relative to REPO: `prefect deploy` records its folder as the pull step


class StackError(RuntimeError):
    """The stack could not be started (what was started is stopped again) or stopped."""


def run_stack(action: str, settings: Settings) -> int:
    """The exit code: up/down 0 when done; status 0 when every component is up, 1 otherwise."""
    try:
        return {"up": stack_up, "down": stack_down, "status": stack_status}[action](settings)
    except StackError as error:
        print(f"adrank stack {action}: {error}", file=sys.stderr)
        return 1


def stack_up(settings: Settings) -> int:
    config = settings.stack
    state = read_state(config.state_dir)
    if state and state.get("ready") and all(is_up(c) for c in state["components"]):
        print(f"the stack is already up (state in {config.state_dir})")
        print_stack(state)
        return 0
    if state:
        print("the stack is partly up: stopping what is left of it, then starting it again")
        stop_stack(state, config.stop_timeout_seconds)
    for port in (config.prefect_port, config.mlflow_port):
        if port_in_use(port):
            raise StackError(f"port {port} on 127.0.0.1 is in use (set stack.prefect_port / stack.mlflow_port)")
    state = {
        "state_dir": str(config.state_dir),
        "prefect_api_url": f"http://127.0.0.1:{config.prefect_port}/api",
        "mlflow_uri": f"http://127.0.0.1:{config.mlflow_port}",
        "components": [],
    }
    try:
        start_stack(settings, state)
    except (StackError, subprocess.SubprocessError, OSError, KeyboardInterrupt) as error:
        stop_stack(state, config.stop_timeout_seconds)
        raise StackError(f"{error}\n(logs in {config.state_dir / 'logs'}; all it started is stopped)") from error
    print(f"the stack is up (state in {config.state_dir})")
    print_stack(state)
    return 0


def start_stack(settings: Settings, state: dict) -> None:
    """Servers, then one worker per work pool (a worker creates its pool), then the deployments."""
    config = settings.stack
    api_url, mlflow_uri = state["prefect_api_url"], state["mlflow_uri"]
    env = os.environ | {"PREFECT_API_URL": api_url}
    # its own PREFECT_HOME keeps the server's database in the state folder; no analytics (offline machines)
    server_env = env | {"PREFECT_HOME": str(config.state_dir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    command = prefect_command("server", "start", "--host", "127.0.0.1", "--port", str(config.prefect_port))
    prefect = start_component(
        state, "prefect-server", server_env, command, url=api_url.removesuffix("/api"), health=f"{api_url}/health"
    )
    # adrank's experiments keep their artifacts in <home>/mlartifacts (tasks/registry.py); the server's
    # artifacts folder holds those of experiments created elsewhere (the UI, other clients)
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(config.mlflow_port)]
    command += ["--backend-store-uri", f"sqlite:///{config.state_dir / 'mlflow.db'}", "--workers", "1"]
    command += ["--artifacts-destination", str(config.state_dir / "mlartifacts")]
    # no job runner: it serves GenAI jobs adrank does not use, in 8 more processes of ~250 MB each
    mlflow_env = env | {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = start_component(state, "mlflow-server", mlflow_env, command, url=mlflow_uri, health=f"{mlflow_uri}/health")
    for component in (prefect, mlflow):
        wait_for(component, partial(is_healthy, component["health"]), config.start_timeout_seconds)

    # flow runs inherit the worker's environment: this home and the stack's MLflow server
    worker_env = env | {"ADRANK_HOME": str(settings.home), "ADRANK_TRACKING__MLFLOW_URI": mlflow_uri}
    for pool in work_pools(REPO / PREFECT_FILE):
        # one at a time: two workers creating their pools at once contend for the server's SQLite database
        since, name = datetime.now(UTC), f"stack-{pool}"
        command = prefect_command("worker", "start", "--pool", pool, "--type", "process", "--name", name)
        worker = start_component(state, f"worker-{pool}", worker_env, command, pool=pool)
        wait_for(worker, partial(worker_online, api_url, pool, name, since), config.start_timeout_seconds)
    deploy = prefect_command("--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE))
    done = subprocess.run(
        deploy, cwd=REPO, env=env, capture_output=True, text=True, timeout=config.start_timeout_seconds
    )
    if done.returncode != 0:
        raise StackError(f"prefect deploy failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    state["ready"] = True
    write_state(state)


def stack_down(settings: Settings) -> int:
    state = read_state(settings.stack.state_dir)
    if state is None:
        print(f"the stack is not running (no {settings.stack.state_dir / 'stack.json'})")
        return 0
    stop_stack(state, settings.stack.stop_timeout_seconds)
    print(f"the stack is down: stopped {', '.join(c['name'] for c in state['components'])}")
    return 0


def stack_status(settings: Settings) -> int:
    state = read_state(settings.stack.state_dir)
    if state is None:
        print(f"the stack is not running (no {settings.stack.state_dir / 'stack.json'})")
        return 1
    print_stack(state)
    return 0 if all(is_up(c) for c in state["components"]) else 1


def print_stack(state: dict) -> None:
    for component in state["components"]:
        where = component.get("url") or f"pool {component['pool']}"
        condition = "up" if is_up(component) else "alive, not healthy" if is_alive(component) else "dead"
        print(f"  {component['name']:<18} pid {component['pid']:<8} {condition:<18} {where}  log {component['log']}")
    print(f"Prefect UI  {state['prefect_api_url'].removesuffix('/api')}\nMLflow UI   {state['mlflow_uri']}")
    print("to use the stack from a shell (adrank, prefect and mlflow commands), run:")
    print(f"export PREFECT_API_URL={state['prefect_api_url']}")
    print(f"export ADRANK_TRACKING__MLFLOW_URI={state['mlflow_uri']}")
    print(f"export MLFLOW_TRACKING_URI={state['mlflow_uri']}")


def prefect_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def work_pools(prefect_file: Path) -> list[str]:
    """The work pools named in the deployment file's `definitions:` block."""
    definitions = yaml.safe_load(prefect_file.read_text())["definitions"]["work_pools"]
    return [pool["name"] for pool in definitions.values()]


def start_component(state: dict, name: str, env: dict, command: list[str], **info: str) -> dict:
    """Start one component in a new process group and record it in stack.json at once (an interrupted
    `up` leaves nothing that `down` cannot find)."""
    state_dir = Path(state["state_dir"])
    log = state_dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    fields = proc_stat(process.pid)
    component = {"name": name, "pid": process.pid, "start_time": fields and fields[19], "log": str(log), **info}
    state["components"].append(component)
    write_state(state)
    return component


def wait_for(component: dict, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if not is_alive(component):
            raise StackError(f"{component['name']} exited during start-up; see {component['log']}")
        if time.monotonic() > deadline:
            raise StackError(f"{component['name']} not ready after {timeout:.0f} s; see {component['log']}")
        time.sleep(0.5)


def stop_stack(state: dict, timeout: float) -> None:
    """Stop the recorded components, the last started first (workers report their runs' end to a live
    server), then forget them; logs and databases stay."""
    for component in reversed(state["components"]):
        stop_group(component, timeout)
    left = [c["name"] for c in state["components"] if owned_members(c)]
    if left:
        raise StackError(f"still running after SIGKILL: {', '.join(left)}")
    (Path(state["state_dir"]) / "stack.json").unlink(missing_ok=True)


def stop_group(component: dict, timeout: float) -> None:
    """SIGTERM the component's process group, then SIGKILL whatever is left of it after `timeout` seconds."""
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        if not owned_members(component):
            return
        with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
            os.killpg(component["pid"], sig)
        deadline = time.monotonic() + wait_s
        while owned_members(component) and time.monotonic() < deadline:
            time.sleep(0.2)


def is_up(component: dict) -> bool:
    return is_alive(component) and ("health" not in component or is_healthy(component["health"]))


def is_alive(component: dict) -> bool:
    """The recorded process itself runs: not a zombie, not a later process given the same pid."""
    fields = proc_stat(component["pid"])
    return fields is not None and fields[0] != "Z" and fields[19] == component["start_time"]


def owned_members(component: dict) -> list[int]:
    """Live processes of the component's group; none if its pid now names another process."""
    fields = proc_stat(component["pid"])
    if fields is not None and fields[19] != component["start_time"]:
        return []  # a pid is reused only once its old group is empty
    return group_members(component["pid"])


def proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: [0] state (Z: zombie), [2] process group, [19] start time
    in clock ticks since boot. None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in a process group."""
    members = []
    for path in Path("/proc").glob("[0-9]*"):
        fields = proc_stat(int(path.name))
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(path.name))
    return members


def is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def worker_online(api_url: str, pool: str, name: str, since: datetime) -> bool:
    """The worker has sent a heartbeat to the server since `since` (its pool exists by then)."""
    request = urllib.request.Request(
        f"{api_url}/work_pools/{pool}/workers/filter", data=b"{}", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            workers = json.load(response)
    except OSError:
        return False
    beats = [w["last_heartbeat_time"] for w in workers if w["name"] == name and w.get("last_heartbeat_time")]
    return any(datetime.fromisoformat(beat) >= since for beat in beats)


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no obstacle
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def read_state(state_dir: Path) -> dict | None:
    path = state_dir / "stack.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_state(state: dict) -> None:
    """stack.json replaced whole: a reader never sees half of it."""
    state_dir = Path(state["state_dir"])
    partial = state_dir / ".stack.json.partial"
    partial.write_text(json.dumps(state, indent=2))
    partial.replace(state_dir / "stack.json")
