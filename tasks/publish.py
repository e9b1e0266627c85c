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

from tasks.sql_files import load_sql, materialize

RANKING_VIEWS = ("ad_rankings", "latest_ad_rankings")


class PublishCheckError(ValueError):
    """Staged rankings failed a key check; nothing was published."""


def rankings_dir(warehouse: Path) -> Path:
    return warehouse.parent / "ad_rankings"


def publish_rankings(
    warehouse: Path,
    scores_path: Path,
    run_date: date,
    model_name: str,
    model_version: str,
    top_n: int,
    user_id_salt: str | None = None,
    retention: timedelta = timedelta(hours=1),
) -> int:
    """Rank the scores staged in scores_path (Parquet: user_id, ad_id, pctr; see tasks/score.py) and
    publish them as run_date's newest file, which the views switch to at once. With user_id_salt, user
    ids are published as sha256(salt || user_id). Files superseded for longer than retention go.

    Returns the number of rows published.
    """
    params = {
        "run_date": run_date,
        "model_name": model_name,
        "model_version": model_version,
        "scored_at": datetime.now(UTC).replace(tzinfo=None),
        "top_n": top_n,
        "user_id_salt": user_id_salt,
    }
    with duckdb.connect() as con:  # in memory: staging and checks touch nothing published
        con.read_parquet(str(scores_path)).create_view("scored_ads")
        materialize(con, "ad_rankings", params, table="staged_ad_rankings")
        violations = con.execute(load_sql("checks/ad_rankings_keys")).fetchall()
        if violations:
            raise PublishCheckError(f"{warehouse}: staged ad_rankings for {run_date} failed key checks: {violations}")
        folder = rankings_dir(warehouse) / f"run_date={run_date.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".*.tmp"):  # left by a writer killed mid-write; never visible to readers
            stale.unlink()
        target = folder / f"{params['scored_at']:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = folder / f".{target.name}.tmp"  # hidden: the views' glob never matches it
        con.table("staged_ad_rankings").order("user_id, rank").write_parquet(str(tmp))
        rows = len(con.table("staged_ad_rankings"))
    _durable_rename(tmp, target)
    ensure_views(warehouse)
    remove_superseded(warehouse, retention)
    return rows


def remove_superseded(warehouse: Path, retention: timedelta) -> list[Path]:
    """Delete publish files whose run_date has had a newer file for longer than retention."""
    removed, now = [], datetime.now().timestamp()
    for folder in sorted(rankings_dir(warehouse).glob("run_date=*")):
        files = sorted(folder.glob("*.parquet"))  # names start with scored_at: oldest first
        for older, newer in zip(files, files[1:], strict=False):
            if now - newer.stat().st_mtime > retention.total_seconds():
                older.unlink()
                removed.append(older)
    return removed


def ensure_views(warehouse: Path) -> None:
    """Create the analyst views in warehouse.duckdb unless they are already there (then it is not written)."""
    if _views_present(warehouse):
        return
    warehouse.parent.mkdir(parents=True, exist_ok=True)
    glob = str(rankings_dir(warehouse) / "run_date=*" / "*.parquet")
    with duckdb.connect(str(warehouse)) as con:
        _move_legacy_table(con, warehouse)
        con.execute(load_sql("views/ad_rankings").format(rankings_glob=_string_literal(glob)))
        con.execute(load_sql("views/latest_ad_rankings"))


def _views_present(warehouse: Path) -> bool:
    if not warehouse.exists():
        return False
    try:
        with duckdb.connect(str(warehouse), read_only=True) as con:
            views = {
                row[0] for row in con.execute("select view_name from duckdb_views() where not internal").fetchall()
            }
    except duckdb.IOException:
        # another process holds the file for writing; published data is already in place, views predate it
        return True
    return set(RANKING_VIEWS) <= views


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
