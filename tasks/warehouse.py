"""The warehouse: each published table is a Delta Lake table (a folder of Parquet files and a `_delta_log`)
beside warehouse.duckdb, which holds the analysts' views over them (sql/views/, `delta_scan`). The format
does what a warehouse needs (docs/architecture.md, "Publishing and analysts"):

- a publish of a date (a partition) replaces it in one commit (`overwrite` with a predicate on the date):
  a reader sees the date whole, before or after, never a mix, and a writer killed before its commit
  changed nothing; readers never block the writer, which never writes warehouse.duckdb to publish;
- a new column joins the table in the same commit (schema merge); the views bind the table at each query
  (those that `select *` show the column at once; ad_rankings names its columns), so no schema change
  needs warehouse.duckdb;
- every commit is a version: `adrank rankings --as-of` reads one, and `adrank unpublish` restores a date's
  previous publish (unpublish) while its files are within `retention`; vacuum deletes what no version in
  that window needs, and checkpoints (every CHECKPOINT_INTERVAL commits) keep the log short to read.

warehouse.duckdb is opened for writing only to create the views (a table's first publish, or the upgrade
from adrank's earlier hand-made layout: tasks/warehouse_upgrade.py). Time travel: tasks/table_history.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import DeltaError, TableNotFoundError

from tasks.object_storage import connect_s3, is_s3_url, s3_access_from_env, s3_storage_options, wheel_extension
from tasks.sql_files import load_sql

if TYPE_CHECKING:
    from tasks.config import Settings

# each published table -> the column it is partitioned by (a publish replaces whole partitions)
PARTITIONS = {
    "ad_rankings": "run_date",
    "model_daily_metrics": "run_date",
    "input_drift": "run_date",
    "ad_daily_ctr": "impression_date",
    "model_versions": "model_name",
}
# each published table -> its views in warehouse.duckdb (sql/views/<view>.sql)
VIEWS = {
    "ad_rankings": ("ad_rankings", "latest_ad_rankings"),
    "model_daily_metrics": ("model_daily_metrics",),
    "input_drift": ("input_drift",),
    "ad_daily_ctr": ("ad_daily_ctr",),
    "model_versions": ("model_versions",),
}
# a view over a Delta table holds this; one without it reads adrank's earlier layout and is recreated
DELTA_VIEW_MARKER = "delta_scan"
# a reader replays at most this many JSON commits after the newest checkpoint (Delta's default: 100)
CHECKPOINT_INTERVAL = 20
# a writer holds warehouse.duckdb for milliseconds (creating views), an analyst's connection for hours: creating
# the views waits this long for it, then leaves them to the next publish or `adrank views`
LOCK_WAIT_SECONDS = 10


@dataclass(frozen=True)
class Warehouse:
    """Where the published tables live: warehouse.duckdb (the views; a local file) and the Delta tables, in a
    folder or under s3://bucket/prefix (`warehouse_tables`; default: the folder of warehouse.duckdb). A plain
    Path given where a Warehouse is expected is warehouse.duckdb with its tables beside it."""

    views: Path
    tables: str | None = None

    def table_uri(self, table: str) -> str:
        return f"{self.tables.rstrip('/')}/{table}" if self.tables else str(self.views.parent / table)

    @property
    def remote(self) -> bool:
        return self.tables is not None and is_s3_url(self.tables)

    def storage_options(self) -> dict[str, str] | None:
        """deltalake's S3 options from the AWS environment variables (as data.logs reads them), or None."""
        return s3_storage_options(s3_access_from_env()) if self.remote else None


def located(warehouse: Path | Warehouse) -> Warehouse:
    return warehouse if isinstance(warehouse, Warehouse) else Warehouse(Path(warehouse))


def of(settings: Settings) -> Warehouse:
    """The configured warehouse: `warehouse` (the views) and `warehouse_tables`."""
    return Warehouse(settings.warehouse, settings.warehouse_tables)


def table_path(warehouse: Path | Warehouse, table: str) -> Path:
    """The local folder of a published table beside warehouse.duckdb (where the hand-made layout kept it)."""
    return located(warehouse).views.parent / table


def open_table(warehouse: Path | Warehouse, table: str, version: int | datetime | None = None) -> DeltaTable | None:
    """The table's Delta table (at a version or time), or None before its first publish."""
    where = located(warehouse)
    uri, options = where.table_uri(table), where.storage_options()
    if not DeltaTable.is_deltatable(uri, options):
        return None
    try:
        delta = DeltaTable(uri, version=version if isinstance(version, int) else None, storage_options=options)
        if isinstance(version, datetime):
            delta.load_as_version(version)
        return delta
    except TableNotFoundError:
        return None
    except DeltaError as error:  # a version or time before the table, or beyond the log's retention
        raise LookupError(f"{uri}: no version at {version}: {error}") from error


def published_partitions(warehouse: Path | Warehouse, table: str) -> list[str]:
    """The partition values (as text) a table holds now, sorted."""
    delta = open_table(warehouse, table)
    key = PARTITIONS[table]
    return sorted({part[key] for part in delta.partitions()}) if delta else []


def read_table(warehouse: Path | Warehouse, table: str) -> pa.Table | None:
    """A published table's rows now (its newest version), or None before its first publish."""
    delta = open_table(warehouse, table)
    return None if delta is None else pa.table(delta.to_pyarrow_table())


def write_partitions(warehouse: Path | Warehouse, table: str, rows: pa.Table, retention: timedelta) -> int:
    """Replace the partitions of `rows` (every value of the table's partition column in them) with `rows`, in
    one commit; new columns join the table. Then vacuum what `retention` no longer keeps and make sure the
    views exist. Returns the table's new version. Once committed, nothing raises: a housekeeping failure is a
    warning (a retried publish would commit the same date twice), retried by the next publish."""
    if len(rows) == 0:
        raise ValueError(f"{table}: no rows to publish (a publish replaces its dates; it never empties them)")
    delta = replace_partitions(warehouse, table, rows, pc.unique(rows[PARTITIONS[table]]).to_pylist())
    try:
        vacuum(delta, retention)
        if not warehouse_views_current(warehouse, [table]):
            ensure_views(warehouse)
    except (DeltaError, OSError, duckdb.Error) as error:
        print(f"warning: {table} published (version {delta.version()}), but its housekeeping failed: {error}")
    return delta.version()


def replace_partitions(warehouse: Path | Warehouse, table: str, rows: pa.Table, values: list) -> DeltaTable:
    """One commit: the table's partitions `values` now hold `rows` (none of them, if rows is empty)."""
    where, key = located(warehouse), PARTITIONS[table]
    if not where.remote:
        where.views.parent.mkdir(parents=True, exist_ok=True)
    write_deltalake(
        where.table_uri(table),
        rows,
        mode="overwrite",
        partition_by=[key],
        predicate=partition_predicate(key, values),
        schema_mode="merge",
        configuration={"delta.checkpointInterval": str(CHECKPOINT_INTERVAL)},  # applied when the table is created
        storage_options=where.storage_options(),
    )
    return DeltaTable(where.table_uri(table), storage_options=where.storage_options())


def partition_predicate(key: str, values: list) -> str:
    """`key in (...)` over partition values, as literals (the only SQL Delta's writer takes is a predicate)."""
    literals = ", ".join(_string_literal(str(value)) for value in values)
    return f"{key} in ({literals})"


def vacuum(delta: DeltaTable, retention: timedelta) -> list[str]:
    """Delete the table's files that no version younger than retention reads (superseded publishes, files
    of writers killed before their commit), whole hours as Delta counts them; returns them."""
    hours = math.ceil(retention.total_seconds() / 3600)
    return delta.vacuum(retention_hours=hours, dry_run=False, enforce_retention_duration=False, full=True)


def connect(warehouse: Path | Warehouse, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """warehouse.duckdb with DuckDB's delta extension loaded (from the wheel: nothing is downloaded), and for
    tables in S3 httpfs and the environment's credentials (tasks/object_storage.py)."""
    where = located(warehouse)
    con = duckdb.connect(str(where.views), read_only=read_only)
    con.execute(f"load {_string_literal(str(wheel_extension('delta')))}")
    if where.remote:
        connect_s3(con, where.tables)
    return con


def warehouse_views_current(warehouse: Path | Warehouse, tables: list[str] | None = None) -> bool:
    """Whether warehouse.duckdb has every view of the published tables (or `tables`), reading Delta where the
    tables are now. A file held for writing by another process counts as current, with a warning: checked
    again at the next publish."""
    where = located(warehouse)
    tables = [t for t in (tables or VIEWS) if open_table(where, t) is not None]
    if not where.views.exists():
        return not tables
    try:
        with duckdb.connect(str(where.views), read_only=True) as con:
            views = dict(con.execute("select view_name, sql from duckdb_views() where not internal").fetchall())
    except duckdb.IOException:  # held for writing: a publish never waits for it
        print(f"warning: views not checked: {where.views} is held for writing by another process (`adrank views`)")
        return True
    return all(_reads(views.get(view, ""), where, table) for table in tables for view in VIEWS[table])


def _reads(view_sql: str, where: Warehouse, table: str) -> bool:
    """Whether a view's SQL reads the table where it is now: its URI as a literal, or (beside warehouse.duckdb)
    the folder the file is in, found when queried (_scan_sql); a view over adrank's earlier layout does not."""
    if DELTA_VIEW_MARKER not in view_sql:
        return False
    if where.tables:
        return _string_literal(where.table_uri(table)) in view_sql
    return "temp_directory" in view_sql and "s3://" not in view_sql


def ensure_views(warehouse: Path | Warehouse) -> bool:
    """Create (or recreate) the views of every published table in warehouse.duckdb, and install DuckDB's delta
    extension for this machine's user so that analysts' DuckDB loads it by itself. Returns False, with a
    warning, if another process held the file for LOCK_WAIT_SECONDS: `adrank views` or the next publish
    creates them."""
    where = located(warehouse)
    where.views.parent.mkdir(parents=True, exist_ok=True)
    con = connect_waiting(where)
    if con is None:
        print(f"warning: views not created: {where.views} is held by another process")
        return False
    with con:
        create_views(con, where)
    return True


def create_views(con: duckdb.DuckDBPyConnection, where: Warehouse) -> None:
    """(Re)create the views of every published table in con (warehouse.duckdb, open for writing)."""
    _install_for_analysts(con, where.remote)
    for table in VIEWS:
        if open_table(where, table) is not None:
            for view in VIEWS[table]:
                con.execute(load_sql(f"views/{view}").format(published=_scan_sql(where, table)))


def _install_for_analysts(con: duckdb.DuckDBPyConnection, remote: bool) -> None:
    """INSTALL copies the wheels' extensions (delta; httpfs for tables in S3) into the user's extension
    folder, from where any DuckDB of this version autoloads them; a folder it cannot write only costs
    analysts that step."""
    extensions = [wheel_extension("delta")] + ([wheel_extension("httpfs")] if remote else [])
    try:
        for extension in extensions:
            con.execute(f"install {_string_literal(str(extension))}")
    except duckdb.Error as error:
        print(f"warning: DuckDB's extensions not installed for analysts ({error}); docs/analysts.md")


def connect_waiting(warehouse: Path | Warehouse) -> duckdb.DuckDBPyConnection | None:
    """warehouse.duckdb open for writing, retried while another process holds it, or None after LOCK_WAIT_SECONDS."""
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            return connect(warehouse, read_only=False)
        except duckdb.IOException:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)


def _scan_sql(where: Warehouse, table: str) -> str:
    """delta_scan of the table: its s3:// URI, or its folder, found wherever the warehouse folder is moved or
    mounted:

    1. warehouse.duckdb opened itself (CLI, Python, a BI tool on the file): DuckDB's temp directory of a
       database file is <file>.tmp beside it, so that setting names the folder the file is in now;
    2. otherwise (ATTACHed into another database), when file_search_path is set, its first folder
       (docs/analysts.md);
    3. else the absolute folder the views were created in.
    DuckDB folds the expression to a constant each time a view is queried."""
    if where.tables:  # a folder named in the config, or s3://: as it is
        return f"delta_scan({_string_literal(where.table_uri(table))})"
    warehouse = where.views
    temp_directory = "current_setting('temp_directory')"
    folder = (
        f"case when parse_filename({temp_directory}) = {_string_literal(warehouse.name + '.tmp')} "
        f"then parse_dirpath({temp_directory}) || '/' "
        "when current_setting('file_search_path') <> '' "
        "then split_part(current_setting('file_search_path'), ',', 1) || '/' "
        f"else {_string_literal(str(warehouse.parent.absolute()) + '/')} end"
    )
    return f"delta_scan({folder} || {_string_literal(table)})"


def _string_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
