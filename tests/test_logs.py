from datetime import datetime

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.config import DataConfig
from tasks.logs import LogContractError, log_quality, open_logs
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


@pytest.mark.fault
@pytest.mark.parametrize(
    ("impressions", "ads", "message"),
    [
        ([{k: v for k, v in impression(1).items() if k != "clicked"}], ADS, r"impressions\).*\['clicked'\] missing"),
        ([impression(1, clicked="maybe")], ADS, r"impressions\): a column does not have the contract's type"),
        ([impression(1), impression(1, clicked=True)], ADS, "duplicate impression_id: impression_id=1"),
        ([impression(1, user_id="u9")], ADS, "user_id not in users: impression_id=1, user_id=u9"),
        ([impression(1, ts=datetime(2099, 1, 1))], ADS, "ts in the future: impression_id=1"),
        ([impression(1, ts=datetime(1970, 1, 1))], ADS, "ts before data.earliest_ts: impression_id=1"),
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


@pytest.mark.fault
@pytest.mark.parametrize(
    ("ads", "users", "message"),
    [
        ([*ADS, {"ad_id": "a2", "title": "Beta again"}], USERS, r"(?s)\(ads\).*duplicate ad_id: 'a2' \(2 rows\)"),
        (ADS, [*USERS, {"user_id": "u1"}, {"user_id": "u1"}], r"(?s)\(users\).*duplicate user_id: 'u1' \(3 rows\)"),
        ([*ADS, {"ad_id": None, "title": "Nameless"}], USERS, r"null ad_id: None \(1 rows\)"),
        ([{"ad_id": "a1", "title": "Alpha", "bid": -0.5}], USERS, r"bid not a positive number: 'a1'"),
    ],
)
def test_repeated_or_null_ad_and_user_ids_are_contract_errors(tmp_path, ads, users, message):
    write_logs(tmp_path, [impression(1)], ads, users)
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


@pytest.mark.fault
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


@pytest.mark.fault
def test_truncated_parquet_file_names_the_folder(tmp_path):
    write_logs(tmp_path, [impression(i) for i in range(1, 40)], ADS, USERS)
    part = tmp_path / "impressions" / "part-0.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # a copy cut off half-way
    with pytest.raises(LogContractError, match=r"impressions.*cannot read Parquet"):
        open_logs(str(tmp_path))


@pytest.mark.fault
def test_non_utf8_text_names_the_table_and_file(tmp_path):
    write_logs(tmp_path, [impression(1)], ADS, USERS)
    raw = pa.array([b"Alpha", b"\xff\xfe caf\xe9"], pa.binary())
    titles = pa.Array.from_buffers(pa.string(), 2, raw.buffers())  # a writer that did not check UTF-8
    pq.write_table(pa.table({"ad_id": ["a1", "a2"], "title": titles}), tmp_path / "ads" / "part-0.parquet")
    with pytest.raises(LogContractError, match=r"ads\): unreadable value.*part-0.parquet.*not valid UTF8"):
        open_logs(str(tmp_path))


@pytest.mark.fault
def test_documented_rules_exact_duplicates_kept_once_and_huge_text_truncated_with_counts(tmp_path):
    huge = {"ad_id": "a2", "title": "B" * 1_000_000, "description": "d" * 10}  # a 1 MB title
    write_logs(tmp_path, [impression(1), impression(1), impression(2)], [ADS[0], huge], USERS)
    data = DataConfig(max_text_chars=100)
    con = open_logs(str(tmp_path), data)
    assert con.execute("select count(*) from stg_impressions").fetchone() == (2,)
    assert con.execute("select length(title) from stg_ads where ad_id = 'a2'").fetchone() == (100,)
    assert log_quality(con, data) == {"duplicate_impressions_dropped": 1, "ad_texts_truncated": 1}


@pytest.mark.fault
def test_empty_partitions_are_read_as_no_rows(tmp_path):
    write_logs(tmp_path, [impression(1)], ADS, USERS)
    empty = tmp_path / "impressions" / "empty.parquet"
    pq.write_table(pq.read_table(tmp_path / "impressions" / "part-0.parquet").slice(0, 0), empty)
    (tmp_path / "impressions" / "nothing-here").mkdir()
    assert open_logs(str(tmp_path)).execute("select count(*) from stg_impressions").fetchone() == (1,)
