"""Publish rankings for analysts: a run_date appears whole or not at all, and readers never block the writer.

Each publish writes one new Parquet file, <warehouse folder>/ad_rankings/run_date=<date>/<scored_at>.parquet,
under a hidden name first and renamed into place whole; files are never rewritten, so a reader never
sees a file change under it. Analysts open warehouse.duckdb read-only (any number at once) and query
its views `ad_rankings` (per run_date, the latest publish) and `latest_ad_rankings`; the nightly writer
opens warehouse.duckdb only to create those views the first time. Superseded files are deleted once
they have been superseded for `retention`, longer than any reader's query.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl

from tasks.sql_files import load_sql, materialize

# each published table (a folder of run_date=<date>/<time>.parquet files) -> the views over it (sql/views/)
VIEWS = {
    "ad_rankings": ("ad_rankings", "latest_ad_rankings"),
    "model_daily_metrics": ("model_daily_metrics",),
    "input_drift": ("input_drift",),
}
MONITOR_TABLES = ("model_daily_metrics", "input_drift")
# a warehouse whose view lacks one of these columns predates it: its views are recreated
REQUIRED_VIEW_COLUMNS = {"ad_rankings": ("ecpm",)}


class PublishCheckError(ValueError):
    """Staged rankings failed a key check; nothing was published."""


def table_dir(warehouse: Path, table: str) -> Path:
    """The folder of a published table's files, beside warehouse.duckdb."""
    return warehouse.parent / table


def rankings_dir(warehouse: Path) -> Path:
    return table_dir(warehouse, "ad_rankings")


def publish_rankings(
    warehouse: Path,
    scores_path: Path,
    run_date: date,
    model_name: str,
    model_version: str,
    top_n: int,
    user_id_salt: str | None = None,
    retention: timedelta = timedelta(hours=1),
    objective: str = "pctr",
) -> int:
    """Rank the scores staged in scores_path (Parquet: user_id, ad_id, pctr[, ecpm]; see tasks/score.py) by
    objective ('pctr' or 'ecpm') and
    publish them as run_date's newest file, which the views switch to at once. With user_id_salt, user
    ids are published as sha256(salt || user_id). Files superseded for longer than retention go.

    Returns the number of rows published. Zero rows are refused (PublishCheckError), as are rows that
    fail a key check: the date keeps its earlier publish.
    """
    params = {
        "run_date": run_date,
        "model_name": model_name,
        "model_version": model_version,
        "scored_at": datetime.now(UTC).replace(tzinfo=None),
        "top_n": top_n,
        "user_id_salt": user_id_salt,
        "objective": objective,
    }
    with duckdb.connect() as con:  # in memory: staging and checks touch nothing published
        scored = con.read_parquet(str(scores_path))
        if "ecpm" not in scored.columns:  # staged by a pctr-only scorer
            scored = scored.select("*, null::double as ecpm")
        scored.create_view("scored_ads")
        materialize(con, "ad_rankings", params, table="staged_ad_rankings")
        rows = len(con.table("staged_ad_rankings"))
        if rows == 0:
            # an empty file would not replace the date in the views (they pick the newest publish by its rows)
            raise PublishCheckError(
                f"{warehouse}: no rankings to publish for {run_date} ({scores_path} holds no scores: no active "
                "users, ads or candidates?); what was published for that date is left as it was"
            )
        violations = con.execute(load_sql("checks/ad_rankings_keys")).fetchall()
        if violations:
            raise PublishCheckError(f"{warehouse}: staged ad_rankings for {run_date} failed key checks: {violations}")
        target, tmp = _new_file(rankings_dir(warehouse), run_date, params["scored_at"])
        con.table("staged_ad_rankings").order("user_id, rank").write_parquet(str(tmp))
    _durable_rename(tmp, target)
    ensure_views(warehouse, "ad_rankings")
    remove_superseded(warehouse, retention)
    return rows


def publish_monitoring(
    warehouse: Path, run_date: date, tables: dict[str, pl.DataFrame], retention: timedelta = timedelta(hours=1)
) -> None:
    """Publish a run_date's monitoring tables (MONITOR_TABLES) like rankings: one new file each, renamed
    into place whole, the views switching to it (the newest computed_at per run_date)."""
    computed_at = datetime.now(UTC).replace(tzinfo=None)
    for table, frame in tables.items():
        if table not in MONITOR_TABLES:
            raise ValueError(f"{table!r} is not a monitoring table ({MONITOR_TABLES})")
        target, tmp = _new_file(table_dir(warehouse, table), run_date, computed_at)
        frame.with_columns(pl.lit(computed_at).alias("computed_at")).write_parquet(tmp)
        _durable_rename(tmp, target)
        ensure_views(warehouse, table)
        remove_superseded(warehouse, retention, table)


def published_run_dates(warehouse: Path, table: str = "ad_rankings") -> list[date]:
    """The run_dates a table has at least one publish for, oldest first."""
    folders = table_dir(warehouse, table).glob("run_date=*")
    return sorted(date.fromisoformat(f.name.split("=", 1)[1]) for f in folders if any(f.glob("*.parquet")))


def read_rankings(warehouse: Path, run_date: date) -> pl.DataFrame:
    """run_date's published ad_rankings (user_id, ad_id, rank, model_version), read as an analyst reads them."""
    with duckdb.connect(str(warehouse), read_only=True) as con:
        return con.execute(load_sql("published_rankings"), {"run_date": run_date}).pl()


def _new_file(folder: Path, run_date: date, published_at: datetime) -> tuple[Path, Path]:
    """The next file of a run_date (named by publish time) and the hidden name it is written under."""
    folder = folder / f"run_date={run_date.isoformat()}"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):  # left by a writer killed mid-write; never visible to readers
        stale.unlink()
    target = folder / f"{published_at:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
    return target, folder / f".{target.name}.tmp"  # hidden: the views' glob never matches it


def remove_superseded(warehouse: Path, retention: timedelta, table: str = "ad_rankings") -> list[Path]:
    """Delete publish files whose run_date has had a newer file for longer than retention."""
    removed, now = [], datetime.now().timestamp()
    for folder in sorted(table_dir(warehouse, table).glob("run_date=*")):
        files = sorted(folder.glob("*.parquet"))  # names start with scored_at: oldest first
        for older, newer in zip(files, files[1:], strict=False):
            if now - newer.stat().st_mtime > retention.total_seconds():
                older.unlink()
                removed.append(older)
    return removed


def ensure_views(warehouse: Path, table: str = "ad_rankings") -> None:
    """Create the analyst views of a published table in warehouse.duckdb unless they are already there and
    current (then it is not written)."""
    if _views_current(warehouse, table):
        return
    warehouse.parent.mkdir(parents=True, exist_ok=True)
    glob = str(table_dir(warehouse, table) / "run_date=*" / "*.parquet")
    with duckdb.connect(str(warehouse)) as con:
        if table == "ad_rankings":
            _move_legacy_table(con, warehouse)
        for view in VIEWS[table]:
            con.execute(load_sql(f"views/{view}").format(glob=_string_literal(glob)))


def _views_current(warehouse: Path, table: str) -> bool:
    if not warehouse.exists():
        return False
    try:
        with duckdb.connect(str(warehouse), read_only=True) as con:
            views = {
                row[0] for row in con.execute("select view_name from duckdb_views() where not internal").fetchall()
            }
            columns = {
                row[0]
                for row in con.execute(
                    "select column_name from duckdb_columns() where table_name = $table", {"table": table}
                ).fetchall()
            }
    except duckdb.IOException:
        # another process holds the file for writing; published data is already in place, views predate it
        return True
    return set(VIEWS[table]) <= views and set(REQUIRED_VIEW_COLUMNS.get(table, ())) <= columns


def _move_legacy_table(con: duckdb.DuckDBPyConnection, warehouse: Path) -> None:
    """Warehouses from adrank < 0.2 held ad_rankings as a table: each run_date becomes a Parquet file."""
    tables = {row[0] for row in con.execute("select table_name from duckdb_tables() where not temporary").fetchall()}
    if "ad_rankings" not in tables:
        return
    folder = rankings_dir(warehouse)
    folder.mkdir(parents=True, exist_ok=True)
    for (run_date,) in con.execute("select distinct run_date from ad_rankings").fetchall():
        target = folder / f"run_date={run_date.isoformat()}" / "00000000T000000000000-legacy.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        rows = con.sql("select * from ad_rankings where run_date = $run_date", params={"run_date": run_date})
        rows.write_parquet(str(tmp))
        _durable_rename(tmp, target)
    con.execute("drop view if exists latest_ad_rankings")
    con.execute("drop table ad_rankings")


def _durable_rename(tmp: Path, target: Path) -> None:
    """Rename tmp to target atomically, with both the file and the rename flushed to disk."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _string_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
