"""Publish rankings to the DuckDB warehouse: a run_date appears whole or not at all."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import duckdb

from tasks.sql_files import load_sql, materialize


class PublishCheckError(ValueError):
    """Staged rankings failed a key check; nothing was published."""


def publish_rankings(
    warehouse: Path, scores_path: Path, run_date: date, model_name: str, model_version: str, top_n: int
) -> int:
    """Replace run_date's rows in ad_rankings with the scores staged in scores_path (Parquet: user_id,
    ad_id, pctr; see tasks/score.py), in one transaction.

    Returns the number of rows published. Readers see the old or the new rows, never a mix.
    """
    warehouse.parent.mkdir(parents=True, exist_ok=True)
    params = {
        "run_date": run_date,
        "model_name": model_name,
        "model_version": model_version,
        "scored_at": datetime.now(UTC).replace(tzinfo=None),
        "top_n": top_n,
    }
    with duckdb.connect(str(warehouse)) as con:
        con.execute(load_sql("ad_rankings_ddl"))
        con.execute(load_sql("views/latest_ad_rankings"))
        con.read_parquet(str(scores_path)).create_view("scored_ads")
        materialize(con, "ad_rankings", params, table="staged_ad_rankings")
        violations = con.execute(load_sql("checks/ad_rankings_keys")).fetchall()
        if violations:
            raise PublishCheckError(f"{warehouse}: staged ad_rankings for {run_date} failed key checks: {violations}")
        con.execute("begin transaction")
        try:
            con.execute(load_sql("ad_rankings_delete_run_date"), {"run_date": run_date})
            con.table("staged_ad_rankings").insert_into("ad_rankings")
            con.execute("commit")
        except BaseException:
            con.execute("rollback")
            raise
        return len(con.table("staged_ad_rankings"))
