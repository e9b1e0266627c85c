"""SQL lives in sql/ and is loaded by name."""

from importlib.resources import files
from typing import Any

import duckdb


def load_sql(name: str) -> str:
    """The text of sql/<name>.sql; name may hold a sub-folder ('views/latest_ad_rankings')."""
    return (files("sql") / f"{name}.sql").read_text()


def materialize(
    con: duckdb.DuckDBPyConnection, name: str, params: dict[str, Any] | None = None, table: str | None = None
) -> None:
    """Run sql/<name>.sql into a temp table (default: named like the file; names are constants, never config)."""
    con.execute(f"create temp table {table or name} as {load_sql(name)}", params or {})
