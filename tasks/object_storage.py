"""Logs in object storage: data.logs = s3://bucket/prefix, read by DuckDB's httpfs extension.

httpfs comes from the `duckdb-extension-httpfs` wheel (DuckDB cannot download it on an offline worker) and
credentials from the standard AWS environment variables only. They reach DuckDB as a secret of the
connection that reads the logs and nowhere else: not the config, MLflow params, logs or error messages.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import duckdb

from tasks.config import redact

S3_SCHEME = "s3://"
# the service-specific endpoint first, as the AWS SDKs read them; for MinIO and other S3-compatible stores
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")
CREDENTIAL_HINT = "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN"


class LogSourceError(OSError):
    """The log source cannot be reached or read: no such bucket, denied, unreachable endpoint."""


@dataclass(frozen=True)
class S3Access:
    """How to reach S3, from the environment. The secret parts stay out of repr."""

    key_id: str | None = None
    secret: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str | None = None
    endpoint: str | None = None  # host[:port] of an S3-compatible store; None: AWS
    use_ssl: bool = True


def is_s3_url(source: str) -> bool:
    return source.startswith(S3_SCHEME)


def s3_access_from_env(environ: Mapping[str, str] = os.environ) -> S3Access:
    """S3Access from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION (or
    AWS_DEFAULT_REGION) and AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL). No key: anonymous (public buckets)."""
    env = {name: value for name, value in environ.items() if value}  # an empty variable counts as unset
    key_id, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if bool(key_id) != bool(secret):
        raise LogSourceError("set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither (anonymous access)")
    region = next((env[name] for name in REGION_VARIABLES if name in env), None)
    endpoint_variable = next((name for name in ENDPOINT_VARIABLES if name in env), None)
    endpoint, use_ssl = None, True
    if endpoint_variable:
        parts = urlsplit(env[endpoint_variable])
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise LogSourceError(f"{endpoint_variable} must be http(s)://host[:port], e.g. http://127.0.0.1:9000")
        endpoint, use_ssl = parts.netloc, parts.scheme == "https"
    return S3Access(key_id, secret, env.get("AWS_SESSION_TOKEN"), region, endpoint, use_ssl)


def wheel_extension(name: str) -> Path:
    """The <name>.duckdb_extension that the duckdb-extension-<name> wheel ships for this DuckDB: httpfs for
    s3:// logs and tables, delta for the published tables (tasks/warehouse.py). Offline workers cannot
    download them."""
    spec = importlib.util.find_spec(f"duckdb_extension_{name}")
    package = Path(spec.origin).parent if spec and spec.origin else None
    path = package / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension" if package else None
    if path is None or not path.is_file():
        raise LogSourceError(
            f"DuckDB's {name} extension is missing: pip install duckdb-extension-{name}=={duckdb.__version__}"
        )
    return path


def s3_storage_options(access: S3Access) -> dict[str, str]:
    """deltalake's S3 options (object_store's names) for the same access as DuckDB's secret below."""
    options = {
        "AWS_ACCESS_KEY_ID": access.key_id,
        "AWS_SECRET_ACCESS_KEY": access.secret,
        "AWS_SESSION_TOKEN": access.session_token,
        "AWS_REGION": access.region,
        "AWS_ENDPOINT_URL": access.endpoint and f"{'https' if access.use_ssl else 'http'}://{access.endpoint}",
        "AWS_ALLOW_HTTP": None if access.use_ssl else "true",
    }
    return {name: value for name, value in options.items() if value}


def connect_s3(con: duckdb.DuckDBPyConnection, url: str) -> None:
    """Load httpfs into con and give it the environment's S3 credentials as a temporary secret."""
    if urlsplit(url).username is not None:
        raise LogSourceError(f"{redact(url)}: credentials go in AWS_* environment variables, not the URL")
    access = s3_access_from_env()
    # LOAD by path: INSTALL would copy the file under ~/.duckdb, which a worker may not have or may not write
    con.execute(f"load {_literal(str(wheel_extension('httpfs')))}")
    options = {
        "key_id": access.key_id,
        "secret": access.secret,
        "session_token": access.session_token,
        "region": access.region,
        "endpoint": access.endpoint,
        "url_style": "path" if access.endpoint else None,  # S3-compatible stores rarely serve bucket subdomains
        "use_ssl": access.use_ssl,
    }
    sql = ", ".join(f"{name} {_literal(value)}" for name, value in options.items() if value is not None)
    try:
        con.execute(f"create or replace temporary secret adrank_logs (type s3, {sql})")
    except duckdb.Error:
        # DuckDB's message may quote the statement, secret and all: say only what is safe
        raise LogSourceError(f"{url}: DuckDB refused the S3 settings from the environment") from None


def list_parquet(con: duckdb.DuckDBPyConnection, folder: str) -> list[str]:
    """Every Parquet file under the s3:// folder, at any depth (hive partitions), sorted."""
    try:
        rows = con.execute("select file from glob(?) order by file", [f"{folder}/**/*.parquet"]).fetchall()
    except duckdb.Error as error:
        raise s3_error(folder, error) from None
    return [row[0] for row in rows]


def s3_error(url: str, error: duckdb.Error) -> LogSourceError:
    """A LogSourceError naming url: DuckDB's HTTP status and S3 error code, with a hint, and no secret."""
    lines = [line.strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line not in ("", "^") and not line.startswith("LINE ")]  # not the query
    summary = " ".join(lines[:2]).rstrip(".")  # 'HTTP Error: ... (HTTP 403 Forbidden)', 'SignatureDoesNotMatch: ...'
    if "403" in summary or "InvalidAccessKeyId" in summary:
        summary += f"; {CREDENTIAL_HINT}"
    elif "NoSuchBucket" in summary:
        summary += "; is the bucket in data.logs right?"
    elif "resolve" in summary or "connect" in summary.lower():
        summary += "; check AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) and the network"
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):  # DuckDB does not print them; make sure
        if os.environ.get(name):
            summary = summary.replace(os.environ[name], "***")
    return LogSourceError(f"{url}: cannot read from object storage: {summary}")


def _literal(value: str | bool) -> str:
    """A SQL literal: CREATE SECRET and LOAD take no bound parameters."""
    if isinstance(value, bool):
        return str(value).lower()
    return "'" + value.replace("'", "''") + "'"
