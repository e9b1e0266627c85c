from datetime import datetime

import duckdb
import pytest

from tasks.logs import LogContractError, open_logs
from tests.conftest import write_logs

ADS = [{"ad_id": "a1", "title": "Alpha"}, {"ad_id": "a2", "title": "Beta"}]
USERS = [{"user_id": "u1"}]


def impression(i: int, clicked: bool = False, **extra) -> dict:
    return {
        "impression_id": i,
        "ts": datetime(2026, 1, 1, 10, i),
        "user_id": "u1",
        "ad_id": "a1",
        "clicked": clicked,
    } | extra


def test_optional_columns_default_and_extra_columns_pass(tmp_path):
    root = write_logs(tmp_path, [impression(1, campaign="x")], ADS, USERS)
    con = open_logs(str(root))
    assert con.execute("select position from stg_impressions").fetchall() == [(None,)]
    assert con.execute("select is_active, description from stg_ads where ad_id = 'a1'").fetchone() == (True, None)


def test_hive_partitions_are_read(tmp_path):
    write_logs(tmp_path, [impression(1)], ADS, USERS)
    (tmp_path / "impressions" / "date=2026-01-01").mkdir()
    (tmp_path / "impressions" / "part-0.parquet").rename(tmp_path / "impressions" / "date=2026-01-01" / "p.parquet")
    part = tmp_path / "impressions" / "date=2026-01-02"
    part.mkdir()
    duckdb.sql(
        f"copy (select 2 as impression_id, timestamp '2026-01-02 08:00' as ts, 'u1' as user_id, 'a2' as ad_id, "
        f"true as clicked) to '{part}/p.parquet'"
    )
    con = open_logs(str(tmp_path))
    assert con.execute("select count(*), sum(is_clicked::int) from stg_impressions").fetchone() == (2, 1)


def test_duckdb_file_source(tmp_path):
    path = tmp_path / "logs.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(
            "create table impressions as select 1 as impression_id, timestamp '2026-01-01' as ts, "
            "'u1' as user_id, 'a1' as ad_id, false as clicked"
        )
        con.execute("create table ads as select 'a1' as ad_id, 'Alpha' as title")
        con.execute("create view users as select 'u1' as user_id, 30 as age")
    con = open_logs(str(path))
    assert con.execute("select * from stg_users").fetchall() == [("u1", 30)]


@pytest.mark.parametrize(
    ("impressions", "ads", "message"),
    [
        ([{k: v for k, v in impression(1).items() if k != "clicked"}], ADS, r"impressions\).*\['clicked'\] missing"),
        ([impression(1, clicked="maybe")], ADS, r"impressions\): a column does not have the contract's type"),
        ([impression(1), impression(1)], ADS, "duplicate impression_id: impression_id=1"),
        ([impression(1, ad_id="zz")], ADS, "ad_id not in ads: impression_id=1, user_id=u1, ad_id=zz"),
        ([impression(1, user_id=None)], ADS, "null key: impression_id=1"),
        ([impression(1)], [{"ad_id": "a1"}], r"ads\).*\['title'\] missing"),
    ],
)
def test_contract_violations_name_the_table_column_and_rows(tmp_path, impressions, ads, message):
    write_logs(tmp_path, impressions, ads, USERS)
    with pytest.raises(LogContractError, match=message) as error:
        open_logs(str(tmp_path))
    assert str(tmp_path) in str(error.value)


def test_missing_source_and_missing_table(tmp_path):
    with pytest.raises(LogContractError, match="does not exist"):
        open_logs(str(tmp_path / "nope"))
    write_logs(tmp_path, [impression(1)], ADS, USERS)
    (tmp_path / "users" / "part-0.parquet").unlink()
    with pytest.raises(LogContractError, match=r"users.*no Parquet files"):
        open_logs(str(tmp_path))


def test_corrupt_parquet_names_the_folder(tmp_path):
    write_logs(tmp_path, [impression(1)], ADS, USERS)
    (tmp_path / "ads" / "part-0.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(LogContractError, match=r"ads.*cannot read Parquet"):
        open_logs(str(tmp_path))


def test_mixed_partitioned_and_flat_files_are_a_clear_error(tmp_path):
    write_logs(tmp_path, [impression(1)], ADS, USERS)
    (tmp_path / "impressions" / "date=2026-01-02").mkdir()
    flat = tmp_path / "impressions" / "part-0.parquet"
    duckdb.sql(f"copy (select * from '{flat}') to '{tmp_path}/impressions/date=2026-01-02/p.parquet'")
    with pytest.raises(LogContractError, match=r"impressions: cannot read Parquet.*partition"):
        open_logs(str(tmp_path))
