"""Read the log contract (impressions, ads, users) from Parquet folders (local or s3://) or a DuckDB file.

The tables become views `raw_<table>` in an in-memory DuckDB connection, then typed staging tables
`stg_<table>` (sql/stg_*.sql) whose keys are checked before anything else reads them.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl

from tasks.config import DataConfig
from tasks.object_storage import connect_s3, is_s3_url, list_parquet, s3_error
from tasks.sql_files import load_sql, materialize

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "impressions": ("impression_id", "ts", "user_id", "ad_id", "clicked"),
    "ads": ("ad_id", "title"),
    "users": ("user_id",),
}
# optional columns the staging SQL reads; absent ones become typed nulls
OPTIONAL_COLUMNS: dict[str, dict[str, str]] = {
    "impressions": {"position": "integer"},
    "ads": {
        "description": "varchar",
        "category": "varchar",
        "advertiser": "varchar",
        "bid": "double",
        "active": "boolean",
        "created_at": "timestamp",
    },
    "users": {},
}
CANDIDATE_COLUMNS = ("user_id", "ad_id")
DUCKDB_SUFFIXES = (".duckdb", ".db")


class LogContractError(ValueError):
    """The logs do not follow the contract in docs/data.md."""


def open_logs(source: str, data: DataConfig | None = None, spill_dir: Path | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection holding checked stg_impressions, stg_ads, stg_users.

    Documented rules instead of errors (counted by log_quality): exact duplicate impression rows are
    kept once; ad titles/descriptions longer than data.max_text_chars are truncated. With spill_dir,
    DuckDB keeps within data.duckdb_memory_limit and spills the rest there (set before the first query:
    DuckDB cannot move its temp directory once it has used it).
    """
    data = data or DataConfig()
    path = _location(source)
    if isinstance(path, Path) and not path.exists():
        raise LogContractError(f"log source {path} does not exist")
    con = duckdb.connect()
    # ts may be naive (meaning UTC) or tz-aware: casting a tz-aware one to the staged naive timestamp uses
    # the session zone, which DuckDB takes from the machine. UTC here makes every day a UTC day everywhere.
    con.execute("set TimeZone = 'UTC'")
    if spill_dir is not None:
        con.execute("set memory_limit = ?", [data.duckdb_memory_limit])
        spill_dir.mkdir(parents=True, exist_ok=True)  # DuckDB creates the folder but not its parents
        con.execute("set temp_directory = ?", [str(spill_dir)])
    if isinstance(path, str):
        connect_s3(con, path)
    for table in REQUIRED_COLUMNS:
        where = f"{path} ({table})"
        _view_source(con, path, table)
        _complete_raw_view(con, table, where)
        _stage(con, table, where, {"max_text_chars": data.max_text_chars} if table == "ads" else {})
    _check_keys(con, path, data)
    return con


def count_ad_daily_ctr(data: DataConfig, until: date) -> pl.DataFrame:
    """Each ad's impressions, clicks and CTR per day in the logs before `until` (sql/ad_daily_ctr.sql),
    what tasks/publish.py publish_ad_daily_ctr writes for analysts."""
    with open_logs(data.logs, data) as con:
        materialize(con, "ad_daily_ctr", {"until": until}, table="staged_ad_daily_ctr")
        violations = con.execute(load_sql("checks/ad_daily_ctr_keys")).fetchall()
        if violations:
            raise LogContractError(f"{data.logs}: ad_daily_ctr before {until} failed key checks: {violations}")
        return con.table("staged_ad_daily_ctr").pl()


def log_quality(con: duckdb.DuckDBPyConnection, data: DataConfig) -> dict[str, int]:
    """How often open_logs applied a documented rule instead of failing: for MLflow and the flow logs."""
    row = con.execute(load_sql("checks/log_quality"), {"max_text_chars": data.max_text_chars}).fetchone()
    return dict(zip(("duplicate_impressions_dropped", "ad_texts_truncated"), map(int, row), strict=True))


def stage_candidates(con: duckdb.DuckDBPyConnection, source: str, table: str) -> None:
    """Stage the optional candidates table (user_id, ad_id) of the same log source as stg_candidates."""
    path = _location(source)
    where = f"{path} ({table})"
    _view_source(con, path, table)
    _source_columns(con, table, CANDIDATE_COLUMNS, where)
    con.execute(f"create view raw_candidates as select * from src_{table}")
    _stage(con, "candidates", where, {})


def _location(source: str) -> Path | str:
    """A local path, or an s3:// URL (a str: Path would fold its '//') without a trailing '/'."""
    return source.rstrip("/") if is_s3_url(source) else Path(source).expanduser()


def _view_source(con: duckdb.DuckDBPyConnection, path: Path | str, table: str) -> None:
    """The log source's `table` as view src_<table>: a DuckDB table/view or a folder of Parquet files."""
    if isinstance(path, str):
        _view_parquet(con, f"{path}/{table}", table)
    elif path.suffix in DUCKDB_SUFFIXES:
        _view_duckdb_table(con, path, table)
    else:
        _view_parquet(con, path / table, table)


def _source_columns(con: duckdb.DuckDBPyConnection, table: str, required: tuple[str, ...], where: str) -> list[str]:
    """src_<table>'s columns; a contract error if a required one is missing."""
    columns = [row[0] for row in con.execute(f"describe src_{table}").fetchall()]
    missing = [c for c in required if c not in columns]
    if missing:
        raise LogContractError(f"{where}: required column(s) {missing} missing; found {columns}")
    return columns


def _view_duckdb_table(con: duckdb.DuckDBPyConnection, path: Path, table: str) -> None:
    attached = {row[0] for row in con.execute("select database_name from duckdb_databases()").fetchall()}
    if "logs" not in attached:
        # ATTACH takes no bound parameter: the path goes in as a literal with quotes doubled.
        literal = str(path).replace("'", "''")
        con.execute(f"attach '{literal}' as logs (read_only)")
    present = {
        row[0]
        for row in con.execute(
            "select table_name from duckdb_tables() where database_name = 'logs' "
            "union select view_name from duckdb_views() where database_name = 'logs'"
        ).fetchall()
    }
    if table not in present:
        raise LogContractError(f"{path}: table '{table}' is missing (found: {sorted(present)})")
    con.execute(f"create view src_{table} as select * from logs.main.{table}")


def _view_parquet(con: duckdb.DuckDBPyConnection, folder: Path | str, table: str) -> None:
    if isinstance(folder, str):
        parquet_files = list_parquet(con, folder)
    else:
        parquet_files = sorted(str(p) for p in folder.rglob("*.parquet")) if folder.is_dir() else []
    if not parquet_files:
        raise LogContractError(f"{folder}: no Parquet files for table '{table}'")
    try:
        relation = con.read_parquet(parquet_files, hive_partitioning=True, union_by_name=True)
    except duckdb.HTTPException as error:  # object storage: denied, or a file gone since it was listed
        raise s3_error(str(folder), error) from None
    except duckdb.Error as error:
        raise LogContractError(f"{folder}: cannot read Parquet for table '{table}': {error}") from error
    relation.create_view(f"src_{table}")


def _complete_raw_view(con: duckdb.DuckDBPyConnection, table: str, where: str) -> None:
    columns = _source_columns(con, table, REQUIRED_COLUMNS[table], where)
    nulls = [f"null::{kind} as {name}" for name, kind in OPTIONAL_COLUMNS[table].items() if name not in columns]
    con.execute(f"create view raw_{table} as select {', '.join(['*', *nulls])} from src_{table}")


def _stage(con: duckdb.DuckDBPyConnection, table: str, where: str, params: dict) -> None:
    try:
        con.execute(f"create table stg_{table} as {load_sql(f'stg_{table}')}", params)
    except duckdb.ConversionException as error:
        raise LogContractError(f"{where}: a column does not have the contract's type: {error}") from error
    except duckdb.InvalidInputException as error:  # e.g. text that is not UTF-8, with the file named
        raise LogContractError(f"{where}: unreadable value: {error}") from error
    except duckdb.HTTPException as error:  # object storage: denied, or a file gone since it was listed
        raise s3_error(where, error) from None


def _check_keys(con: duckdb.DuckDBPyConnection, path: Path | str, data: DataConfig) -> None:
    dimension_violations = con.execute(load_sql("checks/stg_ads_and_users")).fetchall()
    if dimension_violations:
        examples = "\n".join(
            f"  {problem}: {key!r} ({rows} rows)" for table, problem, key, rows in dimension_violations
        )
        tables = sorted({table for table, *_ in dimension_violations})
        raise LogContractError(f"{path} ({', '.join(tables)}): checks failed, e.g.\n{examples}")
    params = {
        "latest_allowed": datetime.now(UTC).replace(tzinfo=None) + timedelta(hours=data.max_clock_skew_hours),
        "earliest_allowed": data.earliest_ts,
    }
    violations = con.execute(load_sql("checks/stg_impressions_keys"), params).fetchall()
    if violations:
        examples = "\n".join(
            f"  {problem}: impression_id={i}, user_id={u}, ad_id={a}, ts={t}" for problem, i, u, a, t in violations
        )
        raise LogContractError(f"{path} (impressions): key checks failed, e.g.\n{examples}")
