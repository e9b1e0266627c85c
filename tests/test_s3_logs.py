"""Logs in object storage: data.logs = s3://bucket/prefix, read through a real S3 API (moto's server on
loopback, checking every request's signature), against the same logs read from the local folder."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import boto3
import polars as pl
import pytest

from flows.cli import main
from tasks.config import flat_params
from tasks.logs import LogContractError, count_ad_daily_ctr
from tasks.object_storage import LogSourceError, S3Access, s3_access_from_env
from tasks.pairs import SPLITS, build_pairs, build_ranking_inputs
from tasks.publish import publish_ad_daily_ctr, publish_rankings, read_published, user_rankings
from tasks.warehouse import Warehouse
from tests.conftest import build_settings

pytestmark = pytest.mark.s3

BUCKET = "adrank-logs"
REGION = "eu-west-1"
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)
NO_MODEL = Path("unused")  # building pairs never loads the model


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port (up in about a second)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def s3_credentials(s3_endpoint: str) -> dict[str, str]:
    """An IAM user allowed s3:* and its access key; from then on moto checks every request's signature."""
    admin = {"endpoint_url": s3_endpoint, "region_name": REGION}
    iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup", **admin)
    iam.create_user(UserName="adrank")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="adrank", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="adrank")["AccessKey"]
    enforce = urllib.request.Request(  # authenticate every request from now on (moto's default: none)
        f"{s3_endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(enforce).close()
    return {
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": s3_endpoint,
    }


@pytest.fixture(scope="module")
def bucket(s3_credentials: dict[str, str], sample_logs: Path, signal_logs: Path) -> str:
    """The tests' sample logs uploaded with boto3: s3://adrank-logs/sample/... and .../signal/..."""
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_credentials["AWS_ENDPOINT_URL"],
        region_name=REGION,
        aws_access_key_id=s3_credentials["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_credentials["AWS_SECRET_ACCESS_KEY"],
    )
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    for prefix, folder in (("sample", sample_logs), ("signal", signal_logs)):
        for file in sorted(folder.rglob("*.parquet")):  # sample_logs' impressions are hive-partitioned
            s3.upload_file(str(file), BUCKET, f"{prefix}/{file.relative_to(folder).as_posix()}")
    for table in ("impressions", "ads"):  # logs without their users/ folder
        s3.upload_file(str(next((sample_logs / table).rglob("*.parquet"))), BUCKET, f"no-users/{table}/p.parquet")
    return BUCKET


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, s3_credentials: dict[str, str], bucket: str) -> dict[str, str]:
    """The environment holds the credentials, and nothing from the machine's own AWS setup."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_credentials.items():
        monkeypatch.setenv(name, value)
    return s3_credentials


def pair_frames(settings) -> dict[str, pl.DataFrame]:
    built = build_pairs(settings)
    return {split: pl.read_parquet(built.paths[split]) for split in SPLITS} | {"meta": pl.DataFrame([built.rows])}


@pytest.mark.parametrize("name", ["sample", "signal"])
def test_pairs_from_s3_equal_pairs_from_the_local_folder(name, aws_env, tmp_path, request):
    local = request.getfixturevalue(f"{name}_logs")
    from_folder = pair_frames(build_settings(tmp_path / "local", NO_MODEL, local))
    from_s3 = pair_frames(build_settings(tmp_path / "s3", NO_MODEL, f"s3://{BUCKET}/{name}"))
    for part, frame in from_folder.items():
        assert frame.height > 0
        assert from_s3[part].equals(frame), part  # row for row, column for column
    assert (tmp_path / "s3" / "pairs" / "train.parquet").exists()  # writes stay local


def test_ranking_inputs_from_s3_equal_those_from_the_local_folder(aws_env, tmp_path, sample_logs):
    local = build_ranking_inputs(build_settings(tmp_path, NO_MODEL, sample_logs))
    remote = build_ranking_inputs(build_settings(tmp_path, NO_MODEL, f"s3://{BUCKET}/sample/"))
    assert remote.run_date == local.run_date
    assert remote.users.equals(local.users) and remote.ads.equals(local.ads)


def test_ad_daily_ctr_from_s3_equals_that_from_the_local_folder(aws_env, tmp_path, sample_logs):
    published = {}
    for name, logs in (("local", str(sample_logs)), ("s3", f"s3://{BUCKET}/sample")):
        settings = build_settings(tmp_path / name, NO_MODEL, logs)
        days = publish_ad_daily_ctr(settings.warehouse, count_ad_daily_ctr(settings.data, date(2026, 10, 8)))
        rows = read_published(settings.warehouse, "ad_daily_ctr").drop("computed_at")
        published[name] = (days, rows.sort("impression_date", "ad_id"))
    assert published["s3"][0] == published["local"][0] and len(published["s3"][0]) > 0
    assert published["s3"][1].equals(published["local"][1])


def test_a_wrong_secret_fails_naming_the_url_and_never_the_secret(aws_env, monkeypatch, tmp_path):
    wrong = "wrong-secret-Zq8v3TLmN0"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises(LogSourceError, match=rf"s3://{BUCKET}/sample/impressions.*403") as error:
        build_pairs(build_settings(tmp_path, NO_MODEL, f"s3://{BUCKET}/sample"))
    message = str(error.value)
    assert "AWS_SECRET_ACCESS_KEY" in message  # the hint names the variable, not its value
    assert wrong not in message and aws_env["AWS_SECRET_ACCESS_KEY"] not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__  # nor in a chained traceback


@pytest.mark.parametrize(
    ("url", "error", "message"),
    [
        ("s3://no-such-bucket/logs", LogSourceError, r"s3://no-such-bucket/logs/impressions.*NoSuchBucket"),
        (f"s3://{BUCKET}/no-such-prefix", LogContractError, rf"s3://{BUCKET}/no-such-prefix/impressions: no Parquet"),
        (f"s3://{BUCKET}/no-users", LogContractError, rf"s3://{BUCKET}/no-users/users: no Parquet files"),
    ],
)
def test_a_missing_bucket_prefix_or_table_is_named(aws_env, tmp_path, url, error, message):
    with pytest.raises(error, match=message):
        build_pairs(build_settings(tmp_path, NO_MODEL, url))


def test_the_secret_stays_out_of_params_and_the_printed_config(aws_env, tmp_path, monkeypatch, capsys):
    secret = aws_env["AWS_SECRET_ACCESS_KEY"]
    settings = build_settings(tmp_path, NO_MODEL, f"s3://{BUCKET}/sample")
    assert not any(secret in value for value in flat_params(settings).values())
    monkeypatch.setenv("ADRANK_HOME", str(tmp_path))
    assert main(["config", "--data.logs", f"s3://{BUCKET}/sample"]) == 0
    printed = capsys.readouterr()
    assert f"s3://{BUCKET}/sample" in printed.out and secret not in printed.out + printed.err
    assert secret not in repr(s3_access_from_env())


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, S3Access()),  # anonymous, AWS's own endpoint
        (
            {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "eu-west-2"},
            S3Access("k", "s", region="eu-west-2"),
        ),
        ({"AWS_REGION": "us-west-1", "AWS_DEFAULT_REGION": "eu-west-2"}, S3Access(region="us-west-1")),
        ({"AWS_ENDPOINT_URL": "http://minio:9000"}, S3Access(endpoint="minio:9000", use_ssl=False)),
        (
            {"AWS_ENDPOINT_URL": "http://other:1", "AWS_ENDPOINT_URL_S3": "https://s3.example.com/"},
            S3Access(endpoint="s3.example.com", use_ssl=True),
        ),
        ({"AWS_SESSION_TOKEN": "t", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}, S3Access("k", "s", "t")),
    ],
)
def test_s3_access_comes_from_the_standard_aws_variables(env, expected):
    assert s3_access_from_env(env) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AWS_ACCESS_KEY_ID": "k"}, "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ({"AWS_SECRET_ACCESS_KEY": "s"}, "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ({"AWS_ENDPOINT_URL": "minio:9000"}, r"AWS_ENDPOINT_URL must be http\(s\)://host\[:port\]"),
    ],
)
def test_incomplete_s3_settings_are_refused(env, message):
    with pytest.raises(LogSourceError, match=message):
        s3_access_from_env(env)


def test_credentials_in_the_url_are_refused_without_echoing_them(aws_env, tmp_path):
    with pytest.raises(LogSourceError, match=r"s3://\*\*\*@") as error:
        build_pairs(build_settings(tmp_path, NO_MODEL, f"s3://AKIAX:hunter2@{BUCKET}/sample"))
    assert "hunter2" not in str(error.value)


def test_sample_data_refuses_to_write_to_object_storage(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADRANK_HOME", str(tmp_path))
    assert main(["sample-data", "--data.logs", f"s3://{BUCKET}/sample"]) == 1
    assert "writes a local folder" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()


def test_published_tables_in_s3_serve_the_flows_the_cli_and_an_analysts_duckdb(aws_env, tmp_path, scores, capsys):
    """warehouse_tables = s3://...: publishing, time travel and unpublish through the S3 API, and an analyst's
    DuckDB (another process, its own S3 secret) reading the views warehouse.duckdb holds over them."""
    tables = f"s3://{BUCKET}/warehouse"
    where = Warehouse(tmp_path / "home" / "warehouse.duckdb", tables)
    day = date(2026, 1, 1)
    publish_rankings(where, scores(0.4), day, "m", "1", top_n=3)
    publish_rankings(where, scores(0.01), day, "m", "2", top_n=3)
    assert not (tmp_path / "home" / "ad_rankings").exists()  # nothing of the table is local
    assert user_rankings(where, "u1", day, None)["ad_id"].to_list() == ["b", "c", "a"]
    assert user_rankings(where, "u1", day, None, as_of=0)["ad_id"].to_list() == ["a", "b", "c"]
    flags = ["--warehouse", str(where.views), "--warehouse_tables", tables]
    assert main(["unpublish", "--date", str(day), *flags]) == 0
    capsys.readouterr()
    assert main(["rankings", "--user", "u1", "--date", str(day), *flags]) == 0
    assert "run_date 2026-01-01, model version 1" in capsys.readouterr().out
    assert read_published(where, "ad_rankings")["model_version"].unique().to_list() == ["1"]

    analyst = (
        "import duckdb, os\n"
        f"con = duckdb.connect({str(where.views)!r}, read_only=True)\n"
        "env = os.environ\n"
        "con.execute(f\"create secret (type s3, key_id '{env['AWS_ACCESS_KEY_ID']}', secret "
        "'{env['AWS_SECRET_ACCESS_KEY']}', region '{env['AWS_REGION']}', endpoint "
        "'{env['AWS_ENDPOINT_URL'].removeprefix('http://')}', url_style 'path', use_ssl false)\")\n"
        "print(con.execute('select count(*), min(model_version) from latest_ad_rankings').fetchone())\n"
    )
    done = subprocess.run([sys.executable, "-c", analyst], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(6, '1')"
