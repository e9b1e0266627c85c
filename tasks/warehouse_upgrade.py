"""The one-time move of a warehouse of adrank's earlier hand-made layout to Delta Lake tables.

Before, each publish was a Parquet file `<table>/<partition>=<value>/[schema-<hash>/]<time>-<id>.parquet`
(newest file per partition wins), and adrank < 0.2 kept ad_rankings as a table inside warehouse.duckdb.
Kept for warehouses written by those versions; to be deleted once none is left to upgrade.
"""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.warehouse import (
    PARTITIONS,
    Warehouse,
    connect_waiting,
    create_views,
    located,
    published_partitions,
    replace_partitions,
    table_path,
)

# the old layout's files: in a schema folder, directly in a partition folder (named by publish time), temp files
OLD_FILE_GLOBS = ("*=*/schema-*/*.parquet", "*=*/[0-9]*.parquet", "*=*/.*.tmp")
# columns a view names that publishes of older adrank lack: the upgrade adds them, empty
ADDED_COLUMNS = {"ad_rankings": {"ecpm": pa.float64()}}
# warehouses this process found (or made) free of the old layout: only old adrank writes it, so every publish
# and read need not look again (globs over every date folder and a read-only open of warehouse.duckdb)
_UPGRADED: set[Path] = set()


class WarehouseUpgradeError(RuntimeError):
    """The one-time upgrade from the hand-made layout needs warehouse.duckdb for a moment and could not get it."""


def upgrade_layout(warehouse: Path | Warehouse) -> None:
    """Convert a warehouse of adrank's hand-made layout (before Delta), once: each table's dates (their
    newest publish) become a Delta table in the same folder, the views switch to it, then the old files go.
    All of it happens while holding warehouse.duckdb (so no old view reads a half-converted folder); a date
    already in the Delta table is left as it is, so a rerun after a kill picks up where it stopped. Raises
    WarehouseUpgradeError, with nothing changed, if another process holds warehouse.duckdb."""
    where = located(warehouse)
    if where.views.absolute() in _UPGRADED:
        return
    old = {table: _old_files(where, table) for table in PARTITIONS}
    legacy_table = _has_legacy_rankings_table(where.views)
    if not any(old.values()) and not legacy_table:
        if legacy_table is False:  # known (the file exists and could be read): nothing old now, nor later
            _UPGRADED.add(where.views.absolute())
        return
    con = connect_waiting(where)
    if con is None:
        raise WarehouseUpgradeError(
            f"{where.views}: moving its published tables to Delta Lake (once, after upgrading adrank) needs the "
            "file for a moment, and another process holds it. Nothing changed: close the other connections and rerun"
        )
    with con:
        for table, files in old.items():
            newest: dict[str, Path] = {}
            for path in sorted((f for f in files if f.suffix == ".parquet"), key=lambda f: f.name):  # publish time
                newest[_partition_of(where, table, path)] = path
            converted = set(published_partitions(where, table))
            for value, path in sorted(newest.items()):
                if value not in converted:
                    _write_old_partition(where, table, value, pq.read_table(path))
        if legacy_table:  # adrank < 0.2 held ad_rankings as a table: its dates, unless files of them are newer
            rows, converted = (
                con.table("ad_rankings").fetch_arrow_table(),
                set(published_partitions(where, "ad_rankings")),
            )
            for value in pc.unique(rows["run_date"]).to_pylist():
                if str(value) not in converted:
                    day_rows = rows.filter(pc.equal(rows["run_date"], value))
                    _write_old_partition(where, "ad_rankings", str(value), day_rows)
            con.execute("drop view if exists latest_ad_rankings")
            con.execute("drop table ad_rankings")
        create_views(con, where)
    for files in old.values():
        for path in files:
            path.unlink(missing_ok=True)
    for table in PARTITIONS:
        for folder in table_path(where, table).glob("*=*/schema-*"):
            shutil.rmtree(folder, ignore_errors=True)
    _UPGRADED.add(where.views.absolute())


def _write_old_partition(warehouse: Path | Warehouse, table: str, value: str, rows: pa.Table) -> None:
    key = PARTITIONS[table]
    if key in rows.column_names:
        rows = rows.drop_columns([key])
    column = pa.array([date.fromisoformat(value) if key != "model_name" else value] * len(rows))
    rows = rows.append_column(key, column)
    for name, kind in ADDED_COLUMNS.get(table, {}).items():
        if name not in rows.column_names:
            rows = rows.append_column(name, pa.nulls(len(rows), kind))
    replace_partitions(warehouse, table, rows, [value])


def _old_files(warehouse: Path | Warehouse, table: str) -> list[Path]:
    folder = table_path(warehouse, table)
    return [path for glob in OLD_FILE_GLOBS for path in folder.glob(glob)] if folder.is_dir() else []


def _partition_of(warehouse: Path | Warehouse, table: str, path: Path) -> str:
    partition = next(p for p in path.relative_to(table_path(warehouse, table)).parts if "=" in p)
    return partition.split("=", 1)[1]


def _has_legacy_rankings_table(warehouse: Path) -> bool | None:
    """Whether warehouse.duckdb holds adrank < 0.2's ad_rankings table; None when unknown: no file yet (old
    adrank could still write one), or held for writing by another process (looked at again next time)."""
    if not warehouse.exists():
        return None
    try:
        with duckdb.connect(str(warehouse), read_only=True) as con:
            query = "select count(*) from duckdb_tables() where table_name = 'ad_rankings' and not temporary"
            return con.execute(query).fetchone()[0] > 0
    except duckdb.IOException:
        return None
