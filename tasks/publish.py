"""Publish for analysts: rankings, monitoring tables, each ad's daily CTR and the registry's versions, each
publish replacing its dates (or model) in the table's Delta Lake table in one commit (tasks/warehouse.py),
so a run_date appears whole or not at all and readers never block the writer. Also the reads the CLI and
the flows make of what was published.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
from duckdb.sqltypes import VARCHAR

from tasks.sql_files import load_sql, materialize
from tasks.table_history import version_at
from tasks.user_keys import lookup_user_ids, published_user_id
from tasks.warehouse import Warehouse, connect, located, published_partitions, read_table, write_partitions
from tasks.warehouse_upgrade import upgrade_layout

MONITOR_TABLES = ("model_daily_metrics", "input_drift")


class PublishCheckError(ValueError):
    """Staged rankings failed a key check; nothing was published."""


def publish_rankings(
    warehouse: Path | Warehouse,
    scores_path: Path,
    run_date: date,
    model_name: str,
    model_version: str,
    top_n: int,
    user_id_salt: str | None = None,
    retention: timedelta = timedelta(hours=1),
    objective: str = "pctr",
) -> int:
    """Rank the scores staged in scores_path (Parquet: user_id, ad_id, pctr[, ecpm]; see tasks/score.py; or
    a folder of such files, e.g. one per shard (tasks/shards.py), read as one table) by objective ('pctr'
    or 'ecpm') and
    publish them as run_date's rows, replacing the date's earlier publish in one commit. With user_id_salt,
    user ids are published as HMAC-SHA256(salt, user_id) (tasks/user_keys.py). Files superseded for longer
    than retention go (earlier publishes stay readable with --as-of and unpublish until then).

    Returns the number of rows published. Zero rows are refused (PublishCheckError), as are rows that
    fail a key check: the date keeps its earlier publish.
    """
    upgrade_layout(warehouse)
    params = {
        "run_date": run_date,
        "model_name": model_name,
        "model_version": model_version,
        "scored_at": datetime.now(UTC).replace(tzinfo=None),
        "top_n": top_n,
        "user_id_salt": user_id_salt,
        "objective": objective,
    }
    views = located(warehouse).views
    with duckdb.connect() as con:  # in memory: staging and checks touch nothing published
        con.create_function("published_user_id", published_user_id, [VARCHAR, VARCHAR], VARCHAR)
        source = Path(scores_path)
        scored = con.read_parquet(str(source / "*.parquet" if source.is_dir() else source))
        if "ecpm" not in scored.columns:  # staged by a pctr-only scorer
            scored = scored.select("*, null::double as ecpm")
        scored.create_view("scored_ads")
        materialize(con, "ad_rankings", params, table="staged_ad_rankings")
        rows = len(con.table("staged_ad_rankings"))
        if rows == 0:
            # an empty publish would delete the date: a failed scoring must not look like that
            raise PublishCheckError(
                f"{views}: no rankings to publish for {run_date} ({scores_path} holds no scores: no active "
                "users, ads or candidates?); what was published for that date is left as it was"
            )
        violations = con.execute(load_sql("checks/ad_rankings_keys")).fetchall()
        if violations:
            raise PublishCheckError(f"{views}: staged ad_rankings for {run_date} failed key checks: {violations}")
        ranked = con.table("staged_ad_rankings").order("user_id, rank").fetch_arrow_table()
    write_partitions(warehouse, "ad_rankings", ranked, retention)
    return rows


def publish_monitoring(
    warehouse: Path | Warehouse,
    run_date: date,
    tables: dict[str, pl.DataFrame],
    retention: timedelta = timedelta(hours=1),
) -> None:
    """Publish a run_date's monitoring tables (MONITOR_TABLES) like rankings: each replaces its run_date
    in one commit, stamped computed_at."""
    upgrade_layout(warehouse)
    computed_at = datetime.now(UTC).replace(tzinfo=None)
    for table, frame in tables.items():
        if table not in MONITOR_TABLES:
            raise ValueError(f"{table!r} is not a monitoring table ({MONITOR_TABLES})")
        stamped = frame.with_columns(pl.lit(run_date).alias("run_date"), pl.lit(computed_at).alias("computed_at"))
        write_partitions(warehouse, table, stamped.to_arrow(), retention)


def publish_ad_daily_ctr(
    warehouse: Path | Warehouse, counted: pl.DataFrame, retention: timedelta = timedelta(hours=1)
) -> list[date]:
    """Publish the days of `counted` (each ad's impressions and clicks per day: tasks/logs.py
    count_ad_daily_ctr) that are new or changed since the last publish (late impressions), replacing those
    days whole in one commit, so a rerun or a backfill counts nothing twice. Returns the days published,
    oldest first."""
    days = changed_days(counted, read_published(warehouse, "ad_daily_ctr"))
    if days:
        computed_at = datetime.now(UTC).replace(tzinfo=None)
        changed = counted.filter(pl.col("impression_date").is_in(days))
        stamped = changed.with_columns(pl.lit(computed_at).alias("computed_at"))
        write_partitions(warehouse, "ad_daily_ctr", stamped.to_arrow(), retention)
    return days


def changed_days(counted: pl.DataFrame, published: pl.DataFrame | None) -> list[date]:
    """The impression_dates whose rows in counted differ from the published ones (or have none). Days no
    longer in the logs keep what was published."""
    if published is None:
        return sorted(counted["impression_date"].unique())
    columns = [c for c in counted.columns if c != "ctr"]  # ctr follows from the counts
    published = published.select(columns).filter(pl.col("impression_date").is_in(counted["impression_date"]))
    new = counted.select(columns).join(published, on=columns, how="anti", nulls_equal=True)
    gone = published.join(counted.select(columns), on=columns, how="anti", nulls_equal=True)
    return sorted(set(new["impression_date"]) | set(gone["impression_date"]))


def publish_model_versions(
    warehouse: Path | Warehouse, versions: pl.DataFrame, retention: timedelta = timedelta(hours=1)
) -> None:
    """Publish a snapshot of registered models' versions (tasks/registry.py model_versions), replacing each
    model's rows in the view `model_versions` in one commit."""
    upgrade_layout(warehouse)
    if versions.is_empty():
        return
    snapshot_at = datetime.now(UTC).replace(tzinfo=None)
    snapshot = versions.with_columns(pl.lit(snapshot_at).alias("snapshot_at"))
    write_partitions(warehouse, "model_versions", snapshot.to_arrow(), retention)


def read_published(warehouse: Path | Warehouse, table: str) -> pl.DataFrame | None:
    """A published table's rows (its Delta table's newest version), or None before its first publish."""
    upgrade_layout(warehouse)
    rows = read_table(warehouse, table)
    return None if rows is None else pl.from_arrow(rows)


def published_run_dates(warehouse: Path | Warehouse, table: str = "ad_rankings") -> list[date]:
    """The dates (partitions) a date-partitioned table holds now, oldest first."""
    upgrade_layout(warehouse)
    return [date.fromisoformat(value) for value in published_partitions(warehouse, table)]


def read_rankings(warehouse: Path | Warehouse, run_date: date) -> pl.DataFrame:
    """run_date's published ad_rankings (user_id, ad_id, rank, model_version), read as an analyst reads them."""
    with connect(warehouse) as con:
        return con.execute(load_sql("published_rankings"), {"run_date": run_date}).pl()


def ranked_by(warehouse: Path | Warehouse, run_date: date, model_name: str) -> str | None:
    """The version of model_name whose published ad_rankings of run_date the views show, or None
    (sql/ranked_by.sql)."""
    if run_date not in published_run_dates(warehouse):
        return None
    with connect(warehouse) as con:
        return con.execute(load_sql("ranked_by"), {"run_date": run_date, "model_name": model_name}).fetchone()[0]


def sample_user_rankings(warehouse: Path | Warehouse, run_date: date, users: int, ads_per_user: int) -> list[dict]:
    """A few users' top ads of run_date as published (sql/sample_user_rankings.sql), as rows."""
    params = {"run_date": run_date, "users": users, "ads_per_user": ads_per_user}
    with connect(warehouse) as con:
        return con.execute(load_sql("sample_user_rankings"), params).pl().to_dicts()


def user_rankings(
    warehouse: Path | Warehouse,
    user_id: str,
    run_date: date | None,
    user_id_salt: str | None,
    as_of: int | datetime | None = None,
) -> pl.DataFrame:
    """One user's published ranking of run_date (None: their latest), best first (sql/user_rankings.sql), as
    published now or, with as_of, at a version of ad_rankings or a time (the version then current)."""
    params = {"user_ids": lookup_user_ids(user_id_salt, user_id), "run_date": run_date}
    with connect(warehouse) as con:
        if as_of is not None:  # a temporary view of that version shadows the analysts' view, for this query
            version = version_at(warehouse, "ad_rankings", as_of)
            path = located(warehouse).table_uri("ad_rankings").replace("'", "''")
            con.execute(f"create temp view ad_rankings as select * from delta_scan('{path}', version => {version})")
        try:
            return con.execute(load_sql("user_rankings"), params).pl()
        except duckdb.IOException as error:  # as of a version whose files were vacuumed
            if as_of is None:
                raise
            raise LookupError(
                f"ad_rankings version {version} can no longer be read: its files are past the retention "
                f"(ranking.superseded_retention_minutes): {error}"
            ) from error
