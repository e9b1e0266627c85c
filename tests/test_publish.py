from datetime import date

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.publish import PublishCheckError, publish_rankings


def staged(table: pa.Table, folder) -> str:
    """The scores as tasks/score.py stages them: a Parquet file."""
    path = folder / f"scores-{len(list(folder.glob('scores-*')))}.parquet"
    pq.write_table(table, path)
    return path


@pytest.fixture
def scores(tmp_path):
    def make(pctr_a: float = 0.4):
        table = pa.table(
            {
                "user_id": ["u1", "u1", "u1", "u2", "u2", "u2"],
                "ad_id": ["a", "b", "c", "a", "b", "c"],
                "pctr": [pctr_a, 0.2, 0.2, 0.1, 0.3, 0.05],
            }
        )
        return staged(table, tmp_path)

    return make


def rows(warehouse, table: str = "ad_rankings") -> list[tuple]:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        return con.execute(
            f"select run_date, user_id, rank, ad_id, pctr, model_version from {table} order by run_date, user_id, rank"
        ).fetchall()


def test_ranks_top_n_per_user_with_ties_broken_by_ad_id(tmp_path, scores):
    warehouse = tmp_path / "w.duckdb"
    assert publish_rankings(warehouse, scores(), date(2026, 1, 1), "m", "1", top_n=2) == 4
    assert rows(warehouse) == [
        (date(2026, 1, 1), "u1", 1, "a", 0.4, "1"),
        (date(2026, 1, 1), "u1", 2, "b", 0.2, "1"),  # b and c tie: b first
        (date(2026, 1, 1), "u2", 1, "b", 0.3, "1"),
        (date(2026, 1, 1), "u2", 2, "a", 0.1, "1"),
    ]


def test_rerun_replaces_the_date_and_latest_view_follows(tmp_path, scores):
    warehouse = tmp_path / "w.duckdb"
    publish_rankings(warehouse, scores(), date(2026, 1, 1), "m", "1", top_n=3)
    publish_rankings(warehouse, scores(), date(2026, 1, 2), "m", "1", top_n=3)
    publish_rankings(warehouse, scores(0.01), date(2026, 1, 2), "m", "2", top_n=3)
    all_rows = rows(warehouse)
    assert len(all_rows) == 12  # 6 per date, none duplicated
    assert {r[5] for r in all_rows if r[0] == date(2026, 1, 2)} == {"2"}
    latest = rows(warehouse, "latest_ad_rankings")
    assert {r[0] for r in latest} == {date(2026, 1, 2)} and len(latest) == 6
    assert latest[0][3] == "b"  # u1's a fell to 0.01 in the rerun


def test_failed_key_check_publishes_nothing(tmp_path, scores):
    warehouse = tmp_path / "w.duckdb"
    publish_rankings(warehouse, scores(), date(2026, 1, 1), "m", "1", top_n=3)
    before = rows(warehouse)
    bad = staged(pa.table({"user_id": ["u1", "u1"], "ad_id": ["a", "a"], "pctr": [0.5, 0.4]}), tmp_path)
    with pytest.raises(PublishCheckError, match=r"duplicate \(run_date, user_id, ad_id\)"):
        publish_rankings(warehouse, bad, date(2026, 1, 1), "m", "9", top_n=3)
    nan = staged(pa.table({"user_id": ["u1"], "ad_id": ["a"], "pctr": [float("nan")]}), tmp_path)
    with pytest.raises(PublishCheckError, match=r"pctr outside \[0, 1\]"):
        publish_rankings(warehouse, nan, date(2026, 1, 1), "m", "9", top_n=3)
    assert rows(warehouse) == before
