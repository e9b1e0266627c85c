"""The warehouse on disk: each published table is a folder of Parquet files beside warehouse.duckdb,
<table>/<partition>=<value>/schema-<hash>/<time>-<id>.parquet, and warehouse.duckdb holds the analysts'
views over them (sql/views/). tasks/publish.py writes the files; this module places them and keeps the
views reading exactly the schema folders on disk.

A file is written under a hidden name, then renamed whole into the folder of its columns (place): files
of one schema folder share their columns, so a view reads each folder as one scan without union_by_name
(which opens every file's footer to bind) and a filter on the date opens only that date's files, plus one
file per folder to bind, however many dates there are (benchmarks/views.py). The views take the date from
the folder names (DATE_PARTITIONED) and find their files beside warehouse.duckdb wherever the folder is
moved or mounted (_files_expression).

A DuckDB file allows one writing process or many readers. Analysts open warehouse.duckdb read-only; the
writer opens it only to create or recreate views: the first time, when a publish starts a schema folder
(new columns), and before the last file of a folder is deleted (a view over a glob that matches no file
fails). While it cannot (another process holds the file), nothing is deleted and a publish the views
cannot read raises ViewsNotUpdatedError; its file stays in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import time
import uuid
from datetime import date, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from tasks.sql_files import load_sql

# each published table (a folder of <partition>=<value>/schema-<hash>/<time>-<id>.parquet files) -> its views
VIEWS = {
    "ad_rankings": ("ad_rankings", "latest_ad_rankings"),
    "model_daily_metrics": ("model_daily_metrics",),
    "input_drift": ("input_drift",),
    "ad_daily_ctr": ("ad_daily_ctr",),
    "model_versions": ("model_versions",),
}
# the partition folder of a table's files (run_date unless named here); its view keeps the newest file per value
PARTITIONS = {"ad_daily_ctr": "impression_date", "model_versions": "model_name"}
# a publish writes its one temp file in seconds to minutes: one untouched this long was left by a killed writer
STALE_TEMP_AGE = timedelta(hours=6)
# this machine, in temp file names: a writer's process id means something only on its own machine
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# a view over files holds this (see _files_expression); one without it names an absolute folder only
PORTABLE_VIEW_MARKER = "temp_directory"
# the views of tables partitioned by a date read it from the folder names (sql/views/), so a filter on the
# date opens only its folders' files; a view without this reads every file and is recreated
PRUNING_VIEW_MARKER = "hive_types"
DATE_PARTITIONED = ("ad_rankings", "model_daily_metrics", "input_drift", "ad_daily_ctr")
# a warehouse whose view lacks one of these columns predates it: its views are recreated
REQUIRED_VIEW_COLUMNS = {"ad_rankings": ("ecpm",)}
# a partition's files sit in a folder named by their columns (_schema_folder); files of older adrank, in the
# partition folder itself, move there when the views are next recreated (read with union_by_name until then)
SCHEMA_FOLDER = "schema-"
# a writer holds warehouse.duckdb for milliseconds (creating views), an analyst's connection for hours: a
# publish waits this long for it before giving up on updating the views
LOCK_WAIT_SECONDS = 10


class ViewsNotUpdatedError(RuntimeError):
    """A file is in place but the views cannot read its schema folder yet: warehouse.duckdb is held by
    another process. Nothing is lost; `adrank views` or the next publish with the file free updates them."""


def table_dir(warehouse: Path, table: str) -> Path:
    """The folder of a published table's files, beside warehouse.duckdb."""
    return warehouse.parent / table


def rankings_dir(warehouse: Path) -> Path:
    return table_dir(warehouse, "ad_rankings")


def partition_key(table: str) -> str:
    return PARTITIONS.get(table, "run_date")


def published_run_dates(warehouse: Path, table: str = "ad_rankings") -> list[date]:
    """The run_dates (partition dates) a table has at least one publish for, oldest first."""
    folders = table_dir(warehouse, table).glob(f"{partition_key(table)}=*")
    return sorted(date.fromisoformat(f.name.split("=", 1)[1]) for f in folders if any(f.glob("**/*.parquet")))


def new_file(warehouse: Path, table: str, partition: date | str, published_at: datetime) -> Path:
    """The hidden name (in the partition folder of a run_date; named by publish time and its writer) the next
    file of a table's partition is written under; place then moves it into its schema folder.

    Temp files other writers left there are removed only if their writer is gone: a process of this machine
    that no longer runs, or any writer after STALE_TEMP_AGE untouched. One still writing keeps its file."""
    value = partition.isoformat() if isinstance(partition, date) else partition
    folder = table_dir(warehouse, table) / f"{partition_key(table)}={value}"
    folder.mkdir(parents=True, exist_ok=True)
    for temp in folder.glob(".*.tmp"):  # never visible to readers
        with contextlib.suppress(FileNotFoundError):  # its writer placed it meanwhile
            if _writer_gone(temp):
                temp.unlink()
    name = f"{published_at:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"  # the views never match a .tmp
    return folder / f".{name}.{os.getpid()}-{_HOST}.tmp"


def place(tmp: Path) -> Path:
    """Rename a file of a partition folder whole into the folder of its columns there: one written under
    new_file's name as <time>-<id>.parquet, one of the layout before schema folders as it is named."""
    name = tmp.name.removeprefix(".").removesuffix(".tmp").rsplit(".", 1)[0] if tmp.name.endswith(".tmp") else tmp.name
    target = tmp.parent / _schema_folder(tmp) / name
    if not target.parent.exists():
        target.parent.mkdir()
        _fsync_directory(tmp.parent)
    _durable_rename(tmp, target)
    return target


def _writer_gone(temp: Path) -> bool:
    """Whether temp's writer (pid-host in its name) can no longer finish it."""
    if temp.stat().st_mtime < time.time() - STALE_TEMP_AGE.total_seconds():
        return True
    pid, _, host = temp.name.removesuffix(".tmp").rsplit(".", 1)[-1].partition("-")
    if host != _HOST or not pid.isdigit():
        return False  # another machine's writer (a shared folder): only its age tells
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        pass
    return False


def _schema_folder(path: Path) -> str:
    """schema-<hash of the file's column names and types, in order>: DuckDB reads a glob without
    union_by_name only if every file has the first file's columns, so each folder is one view scan."""
    columns = "\n".join(f"{field.name}: {field.type}" for field in pq.read_schema(path))
    return SCHEMA_FOLDER + hashlib.sha256(columns.encode()).hexdigest()[:12]


def remove_superseded(warehouse: Path, retention: timedelta, table: str = "ad_rankings") -> list[Path]:
    """Delete publish files whose run_date (partition) has had a newer file for longer than retention, once
    the views read every folder that keeps a file (so each newer file) and no folder left empty (a view over
    a glob that matches no file fails); while the views cannot be brought there (warehouse.duckdb held by
    another process), nothing is deleted."""
    superseded, now = [], datetime.now().timestamp()
    for folder in sorted(table_dir(warehouse, table).glob(f"{partition_key(table)}=*")):
        files = sorted(folder.glob("**/*.parquet"), key=lambda path: path.name)  # named by publish time: oldest first
        for older, newer in zip(files, files[1:], strict=False):
            if now - newer.stat().st_mtime > retention.total_seconds():
                superseded.append(older)
    if not superseded or not ensure_views(warehouse, removing=frozenset(superseded)):
        return []
    for path in superseded:
        path.unlink()
    return superseded


def ensure_views(warehouse: Path, removing: frozenset[Path] = frozenset(), move_old_files: bool = False) -> bool:
    """Create the analyst views of every published table in warehouse.duckdb, or recreate those that are
    out of date (missing, lacking a REQUIRED_VIEW_COLUMNS column, from before views found their files
    wherever the folder is or before a filter on the date read only its files, or not reading exactly the
    table's schema folders, the files in `removing` left out); warehouse.duckdb is written only then. Files
    of adrank before schema folders move into theirs whenever it is written (move_old_files: they are a
    reason to write it).

    Returns False, with a warning, when the views could not be checked or are out of date, because
    warehouse.duckdb stayed held by another process for LOCK_WAIT_SECONDS: they are left as they were."""
    globs = {table: _scan_globs(warehouse, table, removing) for table in VIEWS}  # one listing of the files
    stale = _stale_tables(warehouse, globs)
    if stale is None:
        return False
    old_files = {table for table in VIEWS if _partition_folders_glob(table) in globs[table]}
    if not stale and not (move_old_files and old_files):
        return True
    warehouse.parent.mkdir(parents=True, exist_ok=True)
    con = _connect(warehouse, read_only=False)
    if con is None:
        print(f"warning: views of {', '.join(stale or old_files)} not updated: {warehouse} is held by another process")
        return False
    with con:  # no reader has the file open now (DuckDB: one writer or readers), so no query is running
        if "ad_rankings" in stale:
            _move_legacy_table(con, warehouse)
        for table in sorted(set(stale) | old_files):
            _move_into_schema_folders(warehouse, table, removing)  # the files moved: list them again
            published = _published_sql(warehouse, table, _scan_globs(warehouse, table, removing))
            for view in VIEWS[table]:
                con.execute(load_sql(f"views/{view}").format(published=published))
    return True


def _move_into_schema_folders(warehouse: Path, table: str, removing: frozenset[Path]) -> None:
    """Files of adrank before schema folders (directly in a partition folder) move into their schema
    folder, so their dates are read without union_by_name too. Called only while warehouse.duckdb is open
    for writing, just before the views are recreated: no query runs through the views meanwhile."""
    for path in table_dir(warehouse, table).glob(f"{partition_key(table)}=*/*.parquet"):
        if path not in removing:
            place(path)


def _stale_tables(warehouse: Path, globs: dict[str, list[str]]) -> list[str] | None:
    """The published tables (with files on disk: the globs their views need, _scan_globs) whose views
    ensure_views must (re)create; None when warehouse.duckdb stayed held for writing by another process
    (the views could not be read)."""
    published = [table for table in VIEWS if globs[table]]
    if not warehouse.exists():
        return published
    con = _connect(warehouse, read_only=True)
    if con is None:
        print(f"warning: views not checked: {warehouse} is held for writing by another process")
        return None
    with con:
        views = dict(con.execute("select view_name, sql from duckdb_views() where not internal").fetchall())
        columns = set(con.execute("select table_name, column_name from duckdb_columns()").fetchall())

    def current(table: str) -> bool:
        markers = (PORTABLE_VIEW_MARKER, PRUNING_VIEW_MARKER) if table in DATE_PARTITIONED else (PORTABLE_VIEW_MARKER,)
        return (
            set(VIEWS[table]) <= views.keys()
            and all(marker in views[VIEWS[table][0]] for marker in markers)
            and all((table, column) in columns for column in REQUIRED_VIEW_COLUMNS.get(table, ()))
            and all(_globs_in(views[view], table) == set(globs[table]) for view in VIEWS[table])
        )

    return [table for table in published if not current(table)]


def show_placed(warehouse: Path, table: str, placed: list[Path]) -> None:
    """Bring the views up to date so that they read the files just placed, or raise ViewsNotUpdatedError
    (the files stay in place). Views of adrank before schema folders read the partition folders themselves
    with union_by_name: while they cannot be recreated, the files go there, where those views read them."""
    if not placed or ensure_views(warehouse):
        return
    con = _connect(warehouse, read_only=True) if warehouse.exists() else None
    with con or contextlib.nullcontext():  # held while files move: no writer recreates the views meanwhile
        query = "select sql from duckdb_views() where view_name = $view"
        row = con.execute(query, {"view": VIEWS[table][0]}).fetchone() if con else None
        view_sql = row[0] if row else ""
        unread = [path for path in placed if _scan_glob(table, path) not in _globs_in(view_sql, table)]
        if unread and _reads_partition_folders(view_sql, table):
            for path in unread:
                _durable_rename(path, path.parent.parent / path.name)
            return
    if unread:
        raise ViewsNotUpdatedError(
            f"{', '.join(str(p) for p in unread)} published, but the views of {warehouse} cannot read "
            f"{', '.join(sorted({_scan_glob(table, p) for p in unread}))} (a new schema folder) yet: another "
            "process holds the file. The files stay in place: close other connections to it, then run "
            "`adrank views` (or the next publish updates them)"
        )


def _connect(warehouse: Path, read_only: bool) -> duckdb.DuckDBPyConnection | None:
    """warehouse.duckdb, retried while another process holds it (DuckDB: one writer or many readers), or
    None if it is still held after LOCK_WAIT_SECONDS."""
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            return duckdb.connect(str(warehouse), read_only=read_only)
        except duckdb.IOException:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)


def _reads_partition_folders(view_sql: str, table: str) -> bool:
    """Whether a view reads the files in the partition folders themselves with union_by_name (as views of
    adrank before schema folders did), so it shows a file there whatever its columns."""
    root = re.escape(f"'{_partition_folders_glob(table)}'")
    scan = re.search(rf"{root}(.*?)(?:read_parquet|$)", view_sql, re.S | re.I)
    return bool(scan) and re.search(r"union_by_name\s*=\s*(?:true|cast\('t')", scan.group(1), re.I) is not None


def published_files(warehouse: Path, table: str) -> set[Path]:
    return set(table_dir(warehouse, table).glob(f"{partition_key(table)}=*/**/*.parquet"))


def _partition_folders_glob(table: str) -> str:
    """The glob of files directly in the partition folders (written by adrank before schema folders)."""
    return f"{table}/{partition_key(table)}=*/*.parquet"


def _scan_glob(table: str, path: Path) -> str:
    """The glob, relative to the warehouse folder, of the view scan that reads a published file: its schema
    folder's, or the partition folders' own for files of adrank before schema folders."""
    folder = path.parent.name
    if not folder.startswith(SCHEMA_FOLDER):
        return _partition_folders_glob(table)
    return f"{table}/{partition_key(table)}=*/{folder}/*.parquet"


def _scan_globs(warehouse: Path, table: str, removing: frozenset[Path] = frozenset()) -> list[str]:
    """The globs of the scans a table's views need: one per schema folder with a file not in `removing`."""
    return sorted({_scan_glob(table, path) for path in published_files(warehouse, table) - removing})


def _globs_in(view_sql: str, table: str) -> set[str]:
    """The globs of the files a view's SQL reads (string literals _files_expression wrote)."""
    prefix = re.escape(f"{table}/{partition_key(table)}=*/")
    return set(re.findall(rf"'({prefix}(?:{SCHEMA_FOLDER}[0-9a-f]+/)?\*\.parquet)'", view_sql))


def _published_sql(warehouse: Path, table: str, globs: list[str]) -> str:
    """The union of a table's scans (sql/views/published_files.sql): one per schema folder, without
    union_by_name (files of adrank before schema folders with it); the views select from it."""
    if table in DATE_PARTITIONED:  # the date from the folder names, typed, so that a filter on it prunes folders
        hive = f"hive_partitioning = true, hive_types = {{'{partition_key(table)}': date}}"
    else:
        hive = "hive_partitioning = false"
    scans = [
        load_sql("views/published_files").format(
            files=_files_expression(warehouse, glob),
            hive=hive,
            union_by_name=str(f"/{SCHEMA_FOLDER}" not in glob).lower(),
        )
        for glob in globs
    ]
    return "\n    union all by name\n    ".join(scans)


def _files_expression(warehouse: Path, glob: str) -> str:
    """A glob of a table's files (relative to the warehouse folder) as a SQL expression that DuckDB folds
    to a constant each time a view is queried (a table function takes no subquery, so the view cannot look
    up its database's path), so the views work wherever the folder is moved or mounted, from any working
    directory:

    1. warehouse.duckdb opened itself (CLI, Python, a BI tool on the file): DuckDB's temp directory of a
       database file is <file>.tmp beside it, so that setting names the folder the file is in now;
    2. otherwise (ATTACHed into another database, temp_directory set), when file_search_path is set the
       glob is relative, and DuckDB resolves relative paths against it (docs/analysts.md);
    3. else the absolute folder the views were created in, as before.
    """
    temp_directory = "current_setting('temp_directory')"
    return (
        f"case when parse_filename({temp_directory}) = {_string_literal(warehouse.name + '.tmp')} "
        f"then parse_dirpath({temp_directory}) || '/' "
        "when current_setting('file_search_path') <> '' then '' "
        f"else {_string_literal(str(warehouse.parent.absolute()) + '/')} end || {_string_literal(glob)}"
    )


def _move_legacy_table(con: duckdb.DuckDBPyConnection, warehouse: Path) -> None:
    """Warehouses from adrank < 0.2 held ad_rankings as a table: each run_date becomes a Parquet file."""
    tables = {row[0] for row in con.execute("select table_name from duckdb_tables() where not temporary").fetchall()}
    if "ad_rankings" not in tables:
        return
    for (run_date,) in con.execute("select distinct run_date from ad_rankings").fetchall():
        tmp = new_file(warehouse, "ad_rankings", run_date, datetime(1970, 1, 1))  # sorts before every publish
        rows = con.sql("select * from ad_rankings where run_date = $run_date", params={"run_date": run_date})
        rows.write_parquet(str(tmp))
        place(tmp)
    con.execute("drop view if exists latest_ad_rankings")
    con.execute("drop table ad_rankings")


def _durable_rename(tmp: Path, target: Path) -> None:
    """Rename tmp to target atomically, with both the file and the rename flushed to disk."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    _fsync_directory(target.parent)


def _fsync_directory(folder: Path) -> None:
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _string_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
