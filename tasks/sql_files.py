"""SQL lives in sql/ and is loaded by name."""

from importlib.resources import files


def load_sql(name: str) -> str:
    """The text of sql/<name>.sql; name may hold a sub-folder ('views/latest_ad_rankings')."""
    return (files("sql") / f"{name}.sql").read_text()
