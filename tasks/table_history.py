"""A published table's history, from its Delta log: read a version or time (`adrank rankings --as-of`), and
undo a date's latest publish (`adrank unpublish`). Both reach back as far as the warehouse's retention:
older replaced files are vacuumed (tasks/warehouse.py vacuum).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from tasks.warehouse import PARTITIONS, Warehouse, open_table, published_partitions, replace_partitions


def version_at(warehouse: Path | Warehouse, table: str, as_of: int | datetime) -> int:
    """The table's version at as_of: that version, or the newest committed at or before a time; a LookupError
    saying which versions and times there are otherwise (the log keeps 30 days of them)."""
    latest = open_table(warehouse, table)
    if latest is None:
        raise LookupError(f"{table}: nothing published yet")
    first_version, first_ms = min((commit["version"], commit["timestamp"]) for commit in latest.history())
    if isinstance(as_of, int):
        if not first_version <= as_of <= latest.version():
            raise LookupError(f"{table} has versions {first_version} to {latest.version()}, not {as_of}")
        return as_of
    first = datetime.fromtimestamp(first_ms / 1000, UTC)
    if as_of.astimezone(UTC) < first:
        raise LookupError(f"{table}: its oldest version kept is from {first:%Y-%m-%d %H:%M:%S} UTC, after {as_of}")
    return open_table(warehouse, table, as_of).version()


class NoEarlierPublishError(LookupError):
    """unpublish: the date has no earlier publish within the warehouse's retention; nothing changed."""


def unpublish(warehouse: Path | Warehouse, table: str, value: str) -> int:
    """Restore a partition (a date of ad_rankings) to what it held before its latest publish, as a new
    commit (so this too can be undone), or remove it if it had none. Raises NoEarlierPublishError when the
    earlier publish is older than the log or its files were vacuumed. Returns the new version."""
    delta = open_table(warehouse, table)
    key = PARTITIONS[table]
    if delta is None or value not in published_partitions(warehouse, table):
        raise NoEarlierPublishError(f"{table}: nothing published for {key} {value}")
    current = _partition_files(delta, key, value)
    version, earlier = delta.version(), None
    while version > 0:  # back to the newest version whose files of the partition differ: the publish before
        version -= 1
        try:
            earlier = open_table(warehouse, table, version)
        except LookupError as error:  # the log of that version was cleaned up
            raise NoEarlierPublishError(f"{table} {key} {value}: version {version} is gone ({error})") from error
        if _partition_files(earlier, key, value) != current:
            break
    else:
        earlier = None  # the date's first publish is the only one: unpublishing it removes the date
    try:
        rows = earlier.to_pyarrow_table(partitions=[(key, "=", value)]) if earlier else delta.schema().to_arrow()
    except (DeltaError, OSError) as error:
        raise NoEarlierPublishError(
            f"{table} {key} {value}: the publish before (version {version}) was vacuumed; nothing changed "
            f"(warehouse retention: ranking.superseded_retention_minutes): {error}"
        ) from error
    rows = pa.table(rows) if earlier else pa.schema(rows).empty_table()
    return replace_partitions(warehouse, table, rows, [value]).version()


def _partition_files(delta: DeltaTable, key: str, value: str) -> set[str]:
    actions = pa.table(delta.get_add_actions(flatten=True)).to_pydict()
    values = actions.get(f"partition.{key}", [])
    return {path for path, part in zip(actions["path"], values, strict=True) if str(part) == value}
