"""A published table's history, from its Delta log: read a version or time (`adrank rankings --as-of`), and
undo a date's latest publish (`adrank unpublish`). Both reach back as far as the warehouse's retention:
older replaced files are vacuumed (tasks/warehouse.py vacuum).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import DeltaError

from tasks.warehouse import PARTITIONS, open_table, partition_predicate, published_partitions, table_path


def version_at(warehouse: Path, table: str, as_of: int | datetime) -> int:
    """The table's version at as_of: that version (checked), or the newest committed at or before a time."""
    delta = open_table(warehouse, table, as_of)
    if delta is None:
        raise LookupError(f"{table_path(warehouse, table)}: nothing published yet")
    return delta.version()


class NoEarlierPublishError(LookupError):
    """unpublish: the date has no earlier publish within the warehouse's retention; nothing changed."""


def unpublish(warehouse: Path, table: str, value: str) -> int:
    """Restore a partition (a date of ad_rankings) to what it held before its latest publish, as a new
    commit (so this too can be undone), or remove it if it had none. Raises NoEarlierPublishError when the
    earlier publish is older than the log or its files were vacuumed. Returns the new version."""
    delta = open_table(warehouse, table)
    key = PARTITIONS[table]
    if delta is None or value not in published_partitions(warehouse, table):
        raise NoEarlierPublishError(f"{table_path(warehouse, table)}: nothing published for {key} {value}")
    current = _partition_files(delta, key, value)
    version = delta.version()
    while version > 0:  # back to the newest version whose files of the partition differ: the publish before
        version -= 1
        try:
            earlier = DeltaTable(str(table_path(warehouse, table)), version=version)
        except DeltaError as error:  # the log of that version was cleaned up
            raise NoEarlierPublishError(f"{table} {key} {value}: version {version} is gone ({error})") from error
        files = _partition_files(earlier, key, value)
        if files != current:
            break
    else:
        files = set()
    predicate = partition_predicate(key, [value])
    if not files:
        delta.delete(predicate)
        return DeltaTable(str(table_path(warehouse, table))).version()
    missing = [f for f in files if not (table_path(warehouse, table) / f).exists()]
    if missing:
        raise NoEarlierPublishError(
            f"{table} {key} {value}: the publish before (version {version}) was vacuumed ({missing[0]}); "
            "nothing changed (warehouse retention: ranking.superseded_retention_minutes)"
        )
    rows = earlier.to_pyarrow_table(partitions=[(key, "=", value)])
    write_deltalake(str(table_path(warehouse, table)), rows, mode="overwrite", predicate=predicate, schema_mode="merge")
    return DeltaTable(str(table_path(warehouse, table))).version()


def _partition_files(delta: DeltaTable, key: str, value: str) -> set[str]:
    actions = pa.table(delta.get_add_actions(flatten=True)).to_pydict()
    values = actions.get(f"partition.{key}", [])
    return {path for path, part in zip(actions["path"], values, strict=True) if str(part) == value}
