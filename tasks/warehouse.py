"""The warehouse: each published table is a Delta Lake table (a folder of Parquet files and a `_delta_log`)
beside warehouse.duckdb, which holds the analysts' views over them (sql/views/, `delta_scan`). The format
does what a warehouse needs (docs/architecture.md, "Publishing and analysts"):

- a publish of a date (a partition) replaces it in one commit (`overwrite` with a predicate on the date):
  a reader sees the date whole, before or after, never a mix, and a writer killed before its commit
  changed nothing; readers never block the writer, which never opens warehouse.duckdb to publish;
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

import importlib.util
import math
import time
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import DeltaError, TableNotFoundError

from tasks.sql_files import load_sql

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


def table_path(warehouse: Path, table: str) -> Path:
    """The folder of a published table (a Delta table), beside warehouse.duckdb."""
    return warehouse.parent / table


def open_table(warehouse: Path, table: str, version: int | datetime | None = None) -> DeltaTable | None:
    """The table's Delta table (at a version or time), or None before its first publish."""
    path = table_path(warehouse, table)
    if not (path / "_delta_log").is_dir():
        return None
    try:
        return DeltaTable(str(path), version=version) if isinstance(version, int) else _at_time(path, version)
    except TableNotFoundError:
        return None
    except DeltaError as error:  # a version or time before the table, or beyond the log's retention
        raise LookupError(f"{path}: no version at {version}: {error}") from error


def _at_time(path: Path, when: datetime | None) -> DeltaTable:
    table = DeltaTable(str(path))
    if when is not None:
        table.load_as_version(when)
    return table


def published_partitions(warehouse: Path, table: str) -> list[str]:
    """The partition values (as text) a table holds now, sorted."""
    delta = open_table(warehouse, table)
    key = PARTITIONS[table]
    return sorted({part[key] for part in delta.partitions()}) if delta else []


def read_table(warehouse: Path, table: str) -> pa.Table | None:
    """A published table's rows now (its newest version), or None before its first publish."""
    delta = open_table(warehouse, table)
    return None if delta is None else pa.table(delta.to_pyarrow_table())


def write_partitions(warehouse: Path, table: str, rows: pa.Table, retention: timedelta) -> int:
    """Replace the partitions of `rows` (every value of the table's partition column in them) with `rows`, in
    one commit; new columns join the table. Then vacuum what `retention` no longer keeps and make sure the
    views exist. Returns the table's new version."""
    key = PARTITIONS[table]
    values = pc.unique(rows[key]).to_pylist()
    path = table_path(warehouse, table)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_deltalake(
        str(path),
        rows,
        mode="overwrite",
        partition_by=[key],
        predicate=partition_predicate(key, values),
        schema_mode="merge",
        configuration={"delta.checkpointInterval": str(CHECKPOINT_INTERVAL)},  # applied when the table is created
    )
    delta = DeltaTable(str(path))
    vacuum(delta, retention)
    if not warehouse_views_current(warehouse, [table]):
        ensure_views(warehouse)
    return delta.version()


def partition_predicate(key: str, values: list) -> str:
    """`key in (...)` over partition values, as literals (the only SQL Delta's writer takes is a predicate)."""
    literals = ", ".join(_string_literal(str(value)) for value in values)
    return f"{key} in ({literals})"


def vacuum(delta: DeltaTable, retention: timedelta) -> list[str]:
    """Delete the table's files that no version younger than retention reads (superseded publishes, files
    of writers killed before their commit), whole hours as Delta counts them; returns them."""
    hours = math.ceil(retention.total_seconds() / 3600)
    return delta.vacuum(retention_hours=hours, dry_run=False, enforce_retention_duration=False, full=True)


def delta_extension() -> Path:
    """The delta.duckdb_extension that the duckdb-extension-delta wheel ships for this DuckDB (offline)."""
    spec = importlib.util.find_spec("duckdb_extension_delta")
    package = Path(spec.origin).parent if spec and spec.origin else None
    path = package / "extensions" / f"v{duckdb.__version__}" / "delta.duckdb_extension" if package else None
    if path is None or not path.is_file():
        raise RuntimeError(f"pip install duckdb-extension-delta=={duckdb.__version__}: the views read Delta tables")
    return path


def connect(warehouse: Path, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """warehouse.duckdb with DuckDB's delta extension loaded (from the wheel: nothing is downloaded)."""
    con = duckdb.connect(str(warehouse), read_only=read_only)
    con.execute(f"load {_string_literal(str(delta_extension()))}")
    return con


def warehouse_views_current(warehouse: Path, tables: list[str] | None = None) -> bool:
    """Whether warehouse.duckdb has every view of the published tables (or `tables`), reading Delta. A file
    held for writing by another process counts as current: checked again next time."""
    tables = [t for t in (tables or VIEWS) if open_table(warehouse, t) is not None]
    if not warehouse.exists():
        return not tables
    try:
        with duckdb.connect(str(warehouse), read_only=True) as con:
            views = dict(con.execute("select view_name, sql from duckdb_views() where not internal").fetchall())
    except duckdb.IOException:
        return True
    return all(DELTA_VIEW_MARKER in views.get(view, "") for table in tables for view in VIEWS[table])


def ensure_views(warehouse: Path) -> bool:
    """Create (or recreate) the views of every published table in warehouse.duckdb, and install DuckDB's delta
    extension for this machine's user so that analysts' DuckDB loads it by itself. Returns False, with a
    warning, if another process held the file for LOCK_WAIT_SECONDS: `adrank views` or the next publish
    creates them."""
    tables = [table for table in VIEWS if open_table(warehouse, table) is not None]
    warehouse.parent.mkdir(parents=True, exist_ok=True)
    con = connect_waiting(warehouse)
    if con is None:
        print(f"warning: views of {', '.join(tables)} not created: {warehouse} is held by another process")
        return False
    with con:
        _install_for_analysts(con)
        for table in tables:
            for view in VIEWS[table]:
                con.execute(load_sql(f"views/{view}").format(published=_scan_sql(warehouse, table)))
    return True


def _install_for_analysts(con: duckdb.DuckDBPyConnection) -> None:
    """INSTALL copies the wheel's extension into the user's extension folder, from where any DuckDB of
    this version autoloads it for delta_scan; a folder it cannot write only costs analysts that step."""
    try:
        con.execute(f"install {_string_literal(str(delta_extension()))}")
    except duckdb.Error as error:
        print(f"warning: DuckDB's delta extension not installed for analysts ({error}); docs/analysts.md")


def connect_waiting(warehouse: Path) -> duckdb.DuckDBPyConnection | None:
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            return connect(warehouse, read_only=False)
        except duckdb.IOException:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)


def _scan_sql(warehouse: Path, table: str) -> str:
    """delta_scan of the table's folder, found wherever the warehouse folder is moved or mounted:

    1. warehouse.duckdb opened itself (CLI, Python, a BI tool on the file): DuckDB's temp directory of a
       database file is <file>.tmp beside it, so that setting names the folder the file is in now;
    2. otherwise (ATTACHed into another database), when file_search_path is set, its first folder
       (docs/analysts.md);
    3. else the absolute folder the views were created in.
    DuckDB folds the expression to a constant each time a view is queried."""
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
