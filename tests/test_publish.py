import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from tasks import warehouse as warehouse_module
from tasks.config import DataConfig
from tasks.logs import count_ad_daily_ctr
from tasks.publish import (
    PublishCheckError,
    publish_ad_daily_ctr,
    publish_model_versions,
    publish_monitoring,
    publish_rankings,
    user_rankings,
)
from tasks.warehouse import VIEWS, ViewsNotUpdatedError, rankings_dir
from tests.conftest import write_logs


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


@pytest.mark.fault
def test_a_publish_of_zero_rows_is_refused_and_the_date_keeps_its_rankings(tmp_path, scores):
    warehouse = tmp_path / "w.duckdb"
    publish_rankings(warehouse, scores(), date(2026, 1, 1), "m", "1", top_n=3)
    before = rows(warehouse)
    empty = staged(
        pa.table(
            {
                "user_id": pa.array([], pa.string()),
                "ad_id": pa.array([], pa.string()),
                "pctr": pa.array([], pa.float64()),
            }
        ),
        tmp_path,
    )
    with pytest.raises(PublishCheckError, match=r"no rankings to publish for 2026-01-01 .*left as it was"):
        publish_rankings(warehouse, empty, date(2026, 1, 1), "m", "2", top_n=3)
    assert rows(warehouse) == before
    assert len(list((tmp_path / "ad_rankings").rglob("*.parquet"))) == 1


READER = """
import json, sys, time
import duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
print("ready", flush=True)
seen, deadline = [], time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    rows = con.execute(
        "select run_date::varchar, count(*), min(model_version), max(model_version) from ad_rankings group by 1"
    ).fetchall()
    seen.append(rows)
print(json.dumps(seen))
"""


def big_scores(folder, version: int, users: int = 400) -> str:
    """Scores whose row count depends on the version, so a mix of two publishes would show."""
    n_ads = 3 + version % 4
    table = pa.table(
        {
            "user_id": [f"u{u}" for u in range(users) for _ in range(n_ads)],
            "ad_id": [f"a{a}" for _ in range(users) for a in range(n_ads)],
            "pctr": [0.5] * (users * n_ads),
        }
    )
    return staged(table, folder)


@pytest.mark.fault
def test_an_analyst_reading_never_blocks_the_writer_nor_sees_a_mix(tmp_path):
    warehouse = tmp_path / "w.duckdb"
    publish_rankings(warehouse, big_scores(tmp_path, 0), date(2026, 1, 1), "m", "0", top_n=10)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(warehouse), "6"], stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "ready"  # the analyst's read-only connection is open
    for version in range(1, 13):  # the nightly writer republishes the same date meanwhile
        publish_rankings(warehouse, big_scores(tmp_path, version), date(2026, 1, 1), "m", str(version), top_n=10)
        time.sleep(0.2)
    out, _ = reader.communicate(timeout=60)
    assert reader.returncode == 0
    snapshots = json.loads(out)
    assert len(snapshots) > 10
    for snapshot in snapshots:
        ((run_date, count, low, high),) = snapshot
        assert low == high  # one publish's rows, never two
        assert count == 400 * (3 + int(low) % 4)  # and all of them
    assert {s[0][2] for s in snapshots} > {"0"}  # the reader saw later publishes too
    assert rows(warehouse)[0][5] == "12"


@pytest.mark.fault
def test_user_ids_can_be_published_hashed(tmp_path, scores):
    warehouse = tmp_path / "w.duckdb"
    publish_rankings(warehouse, scores(), date(2026, 1, 2), "m", "1", top_n=3, user_id_salt="pepper")
    users = {row[1] for row in rows(warehouse)}
    assert users == {hmac.new(b"pepper", u.encode(), hashlib.sha256).hexdigest() for u in ("u1", "u2")}
    # a date published before HMAC (sha256(salt || id)) is still found, and the newer date wins
    legacy = pa.table(
        {"user_id": [hashlib.sha256(b"pepperu1").hexdigest()] * 2, "ad_id": ["a", "b"], "pctr": [0.5, 0.1]}
    )
    publish_rankings(warehouse, staged(legacy, tmp_path), date(2026, 1, 1), "m", "0", top_n=3)
    assert user_rankings(warehouse, "u1", date(2026, 1, 1), "pepper")["ad_id"].to_list() == ["a", "b"]
    assert user_rankings(warehouse, "u1", None, "pepper")["model_version"].unique().to_list() == ["1"]
    assert user_rankings(warehouse, "u1", None, "salt").is_empty()


def test_a_warehouse_with_the_old_ad_rankings_table_is_moved_to_files(tmp_path, scores):
    warehouse = tmp_path / "w.duckdb"
    with duckdb.connect(str(warehouse)) as con:
        con.execute(
            "create table ad_rankings as select date '2025-12-31' as run_date, 'u9' as user_id, 'z' as ad_id, "
            "1 as rank, 0.9::double as pctr, 'm' as model_name, '0' as model_version, now()::timestamp as scored_at"
        )
    publish_rankings(warehouse, scores(), date(2026, 1, 1), "m", "1", top_n=3)
    published = rows(warehouse)
    assert published[0] == (date(2025, 12, 31), "u9", 1, "z", 0.9, "0") and len(published) == 7


def test_ecpm_objective_ranks_by_ecpm_and_views_from_before_ecpm_are_recreated(tmp_path, scores):
    warehouse = tmp_path / "w.duckdb"
    publish_rankings(warehouse, scores(), date(2026, 1, 1), "m", "1", top_n=3)  # pctr: ecpm null
    old = tmp_path / "ad_rankings" / "run_date=2025-12-31" / "20251231T000000000000-old.parquet"
    old.parent.mkdir()
    with duckdb.connect(str(warehouse)) as con:  # a file and views written before ecpm existed
        con.execute(
            f"copy (select date '2025-12-31' as run_date, 'u9' as user_id, 'z' as ad_id, 1 as rank, 0.9 as pctr, "
            f"'m' as model_name, '0' as model_version, now()::timestamp as scored_at) to '{old}'"
        )
        con.execute("create or replace view ad_rankings as select * exclude (ecpm) from latest_ad_rankings")
    ecpm = staged(
        pa.table({"user_id": ["u1", "u1"], "ad_id": ["a", "b"], "pctr": [0.4, 0.1], "ecpm": [400.0, 900.0]}),
        tmp_path,
    )
    publish_rankings(warehouse, ecpm, date(2026, 1, 2), "m", "2", top_n=3, objective="ecpm")
    with duckdb.connect(str(warehouse), read_only=True) as con:
        got = con.execute("select run_date, user_id, rank, ad_id, ecpm from ad_rankings order by all").fetchall()
    assert [r for r in got if r[0] == date(2026, 1, 2)] == [
        (date(2026, 1, 2), "u1", 1, "b", 900.0),  # ranked by ecpm, not by pctr
        (date(2026, 1, 2), "u1", 2, "a", 400.0),
    ]
    assert {r[4] for r in got if r[0] < date(2026, 1, 2)} == {None} and len(got) == 9


def test_superseded_files_are_removed_only_after_the_retention(tmp_path, scores):
    warehouse = tmp_path / "w.duckdb"
    publish_rankings(warehouse, scores(), date(2026, 1, 1), "m", "1", top_n=3)
    publish_rankings(warehouse, scores(), date(2026, 1, 1), "m", "2", top_n=3)
    folder = tmp_path / "ad_rankings" / "run_date=2026-01-01"
    assert len(list(folder.glob("schema-*/*.parquet"))) == 2  # the first is kept for readers still on it
    assert {r[5] for r in rows(warehouse)} == {"2"}
    publish_rankings(warehouse, scores(), date(2026, 1, 1), "m", "3", top_n=3, retention=timedelta(0))
    assert len(list(folder.glob("schema-*/*.parquet"))) == 1 and {r[5] for r in rows(warehouse)} == {"3"}


def impressions_of(days: dict[date, list[tuple[str, bool]]]) -> list[dict]:
    """Impression rows: per day, (ad_id, clicked) shown at noon."""
    rows = []
    for day, shown in days.items():
        for ad_id, clicked in shown:
            ts = datetime.combine(day, datetime.min.time()) + timedelta(hours=12)
            rows.append({"impression_id": len(rows), "ts": ts, "user_id": "u1", "ad_id": ad_id, "clicked": clicked})
    return rows


CTR_ADS = [{"ad_id": "a", "title": "A", "category": "shoes"}, {"ad_id": "b", "title": "B", "category": None}]


def test_ad_daily_ctr_counts_each_day_once_and_republishes_only_changed_days(tmp_path):
    warehouse, day1, day2, day3 = tmp_path / "w.duckdb", date(2026, 1, 1), date(2026, 1, 2), date(2026, 1, 3)
    shown = {day1: [("a", True), ("a", False), ("b", False)], day2: [("a", False), ("b", True)], day3: [("a", True)]}
    logs = write_logs(tmp_path / "logs", impressions_of(shown), CTR_ADS, [{"user_id": "u1"}])
    data = DataConfig(logs=str(logs))
    assert publish_ad_daily_ctr(warehouse, count_ad_daily_ctr(data, day3)) == [day1, day2]  # days before run_date
    assert publish_ad_daily_ctr(warehouse, count_ad_daily_ctr(data, day3)) == []  # a rerun: nothing changed
    assert publish_ad_daily_ctr(warehouse, count_ad_daily_ctr(data, day3 + timedelta(days=1))) == [day3]

    shown[day1].append(("b", True))  # a late impression of day 1
    write_logs(logs, impressions_of(shown), CTR_ADS, [{"user_id": "u1"}])
    assert publish_ad_daily_ctr(warehouse, count_ad_daily_ctr(data, day3 + timedelta(days=1))) == [day1]
    with duckdb.connect(str(warehouse), read_only=True) as con:
        got = con.execute(
            "select impression_date, ad_id, category, impressions, clicks, ctr from ad_daily_ctr order by all"
        ).fetchall()
    assert got == [
        (day1, "a", "shoes", 2, 1, 0.5),
        (day1, "b", None, 2, 1, 0.5),  # republished whole: the late click counted, nothing twice
        (day2, "a", "shoes", 1, 0, 0.0),
        (day2, "b", None, 1, 1, 1.0),
        (day3, "a", "shoes", 1, 1, 1.0),
    ]


def publish_every_table(home) -> dict[str, int]:
    """A home with a publish of every table (tiny hand-made rows); returns each view's row count."""
    warehouse, day = home / "warehouse.duckdb", date(2026, 1, 1)
    scores = staged(pa.table({"user_id": ["u1", "u1"], "ad_id": ["a", "b"], "pctr": [0.4, 0.2]}), home.parent)
    publish_rankings(warehouse, scores, day, "m", "1", top_n=2)
    metrics = pl.DataFrame({"run_date": [day], "model_version": ["1"], "slice": ["overall"], "auc": [0.7]})
    drift = pl.DataFrame({"run_date": [day], "model_version": ["1"], "input": ["pctr"], "psi": [0.01]})
    publish_monitoring(warehouse, day, {"model_daily_metrics": metrics, "input_drift": drift})
    logs = write_logs(home.parent / "logs", impressions_of({day: [("a", True)]}), CTR_ADS, [{"user_id": "u1"}])
    publish_ad_daily_ctr(warehouse, count_ad_daily_ctr(DataConfig(logs=str(logs)), day + timedelta(days=1)))
    versions = pl.DataFrame({"model_name": ["m", "m"], "model_version": ["1", "2"], "is_champion": [True, False]})
    publish_model_versions(warehouse, versions)
    return {view: 2 if view in ("ad_rankings", "latest_ad_rankings", "model_versions") else 1 for view in ALL_VIEWS}


ALL_VIEWS = [view for views in VIEWS.values() for view in views]
COUNT_VIEWS = """
import json, sys
import duckdb
con = duckdb.connect(sys.argv[1], read_only=True, config=json.loads(sys.argv[2]))
if sys.argv[3] != "direct":  # the warehouse ATTACHed into an in-memory database, as some BI tools do
    con = duckdb.connect(config=json.loads(sys.argv[2]))
    con.execute(f"attach '{sys.argv[1]}' as warehouse (read_only)")
    con.execute("use warehouse")
print(json.dumps({view: con.execute(f"select count(*) from {view}").fetchone()[0] for view in sys.argv[4:]}))
"""


def count_views(warehouse, cwd, config: dict | None = None, how: str = "direct") -> dict[str, int]:
    """Each view's row count, read by a separate process started in cwd."""
    args = [sys.executable, "-c", COUNT_VIEWS, str(warehouse), json.dumps(config or {}), how, *ALL_VIEWS]
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_views_work_when_the_home_is_moved_and_opened_from_anywhere(tmp_path):
    home, elsewhere = tmp_path / "old" / "home", tmp_path / "analyst"
    home.mkdir(parents=True)
    elsewhere.mkdir()
    expected = publish_every_table(home)
    assert count_views(home / "warehouse.duckdb", elsewhere) == expected

    moved = tmp_path / "mounted" / "adrank"
    moved.parent.mkdir()
    shutil.move(home, moved)  # the folder moved (or mounted elsewhere): its old path is gone
    assert count_views(moved / "warehouse.duckdb", elsewhere) == expected  # opened itself: no set-up
    assert (
        count_views(moved / "warehouse.duckdb", moved.parent, how="attach", config={"file_search_path": str(moved)})
        == expected
    )
    with pytest.raises(AssertionError, match="No files found"):  # attached, without file_search_path
        count_views(moved / "warehouse.duckdb", elsewhere, how="attach")


def test_views_from_before_they_were_portable_are_recreated(tmp_path, scores):
    warehouse = tmp_path / "w.duckdb"
    publish_rankings(warehouse, scores(), date(2026, 1, 1), "m", "1", top_n=3)
    glob = tmp_path / "ad_rankings" / "run_date=*" / "*" / "*.parquet"
    with duckdb.connect(str(warehouse)) as con:  # the views of adrank before: an absolute glob
        con.execute(f"create or replace view ad_rankings as select * from read_parquet('{glob}')")
    publish_rankings(warehouse, scores(), date(2026, 1, 2), "m", "2", top_n=3)
    with duckdb.connect(str(warehouse), read_only=True) as con:
        sql = con.execute("select sql from duckdb_views() where view_name = 'ad_rankings'").fetchone()[0]
    assert "temp_directory" in sql and "file_search_path" in sql
    assert {r[0] for r in rows(warehouse)} == {date(2026, 1, 1), date(2026, 1, 2)}


def table_scans(warehouse, query: str) -> list[dict]:
    """The Parquet scans of query as DuckDB ran it (EXPLAIN (ANALYZE, FORMAT json)): per scan, the files
    it opened and the rows it returned."""
    with duckdb.connect(str(warehouse), read_only=True) as con:
        profile = json.loads(con.execute(f"explain (analyze, format json) {query}").fetchone()[1])
    scans, nodes = [], [profile]
    while nodes:
        node = nodes.pop()
        nodes.extend(node.get("children", []))
        if node.get("operator_type") == "TABLE_SCAN":
            info = node["extra_info"]
            files = [Path(f.strip()) for f in info["Filename(s)"].split(",")]
            scans.append(
                {"files_read": int(info["Total Files Read"]), "files": files, "rows": node["operator_cardinality"]}
            )
    return scans


def publish_days(warehouse, table: str, days: list[date], version: str) -> None:
    """One publish of table for each day: 4 rows a day (ad_daily_ctr: 2) with model_version = version."""
    if table == "ad_rankings":
        scores = staged(
            pa.table({"user_id": ["u1", "u1", "u2", "u2"], "ad_id": ["a", "b"] * 2, "pctr": [0.4, 0.2] * 2}),
            warehouse.parent,
        )
        for day in days:
            publish_rankings(warehouse, scores, day, "m", version, top_n=2)
    elif table == "ad_daily_ctr":
        # ad_daily_ctr publishes the days whose counts changed: a click per version changes every day
        shown = {day: [("a", True)] * int(version) + [("b", False)] for day in days}
        logs = write_logs(warehouse.parent / "logs", impressions_of(shown), CTR_ADS, [{"user_id": "u1"}])
        counted = count_ad_daily_ctr(DataConfig(logs=str(logs)), max(days) + timedelta(days=1))
        assert publish_ad_daily_ctr(warehouse, counted) == days
    else:
        for day in days:
            frame = pl.DataFrame({"run_date": [day] * 4, "model_version": [version] * 4, "slice": list("abcd")})
            publish_monitoring(warehouse, day, {table: frame})


@pytest.mark.parametrize("table", ["ad_rankings", "model_daily_metrics", "input_drift", "ad_daily_ctr"])
def test_a_query_for_one_date_reads_only_that_dates_files_and_its_latest_publish(tmp_path, table):
    warehouse, days = tmp_path / "w.duckdb", [date(2026, 1, 1) + timedelta(days=d) for d in range(5)]
    key = "impression_date" if table == "ad_daily_ctr" else "run_date"
    publish_days(warehouse, table, days, "1")
    publish_days(warehouse, table, days if table == "ad_daily_ctr" else [days[2]], "2")  # a rerun, within retention
    folder = tmp_path / table / f"{key}={days[2]}"
    assert len(list(folder.glob("schema-*/*.parquet"))) == 2 and len(list((tmp_path / table).rglob("*.parquet"))) >= 6

    scans = table_scans(warehouse, f"select * from {table} where {key} = date '{days[2]}'")
    assert scans and all(
        scan["files_read"] == 2 and {f.parent.parent for f in scan["files"]} == {folder} for scan in scans
    )
    per_day = 2 if table == "ad_daily_ctr" else 4
    assert all(scan["rows"] <= 2 * per_day for scan in scans)  # the two publishes of the date, no other date's rows

    with duckdb.connect(str(warehouse), read_only=True) as con:
        version = "clicks" if table == "ad_daily_ctr" else "model_version"
        got = con.execute(
            f"select {key}, count(*), min({version}), max({version}) from {table} group by 1 order by 1"
        ).fetchall()
    if table == "ad_daily_ctr":  # every day republished: a's clicks 1 -> 2
        assert got == [(day, 2, 0, 2) for day in days]
    else:  # the rerun date whole from its latest publish, the others untouched
        assert got == [(day, per_day, *(("2", "2") if day == days[2] else ("1", "1"))) for day in days]


def test_views_from_before_they_pruned_by_date_are_recreated(tmp_path, scores):
    warehouse, day1, day2 = tmp_path / "w.duckdb", date(2026, 1, 1), date(2026, 1, 2)
    for day in (day1, day2):
        publish_rankings(warehouse, scores(), day, "m", "1", top_n=3)
    glob = tmp_path / "ad_rankings" / "run_date=*" / "*" / "*.parquet"
    with duckdb.connect(str(warehouse)) as con:  # the portable view of adrank before: it read every file
        con.execute(
            "create or replace view ad_rankings as select * from read_parquet(case when "
            f"current_setting('temp_directory') = '' then '' else '' end || '{glob}', hive_partitioning = false) "
            "qualify scored_at = max(scored_at) over (partition by run_date)"
        )
    one_day = f"select * from ad_rankings where run_date = date '{day1}'"
    assert max(scan["files_read"] for scan in table_scans(warehouse, one_day)) == 2
    publish_rankings(warehouse, scores(), date(2026, 1, 3), "m", "2", top_n=3)
    with duckdb.connect(str(warehouse), read_only=True) as con:
        sql = con.execute("select sql from duckdb_views() where view_name = 'ad_rankings'").fetchone()[0]
    assert "hive_types" in sql and "temp_directory" in sql
    scans = table_scans(warehouse, one_day)
    assert all(scan["files_read"] == 1 and scan["files"][0].parent.parent.name == f"run_date={day1}" for scan in scans)
    assert {r[0] for r in rows(warehouse)} == {day1, day2, date(2026, 1, 3)}


def publish_metrics(warehouse, day: date, retention: timedelta = timedelta(hours=1), **extra: float) -> None:
    """A model_daily_metrics publish of day (auc, and any extra columns: a new schema)."""
    frame = pl.DataFrame({"run_date": [day], "model_version": ["1"], "slice": ["overall"], "auc": [0.7], **extra})
    publish_monitoring(warehouse, day, {"model_daily_metrics": frame}, retention=retention)


def metrics(warehouse) -> list[tuple]:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        return con.execute("select run_date, auc, logloss from model_daily_metrics order by run_date").fetchall()


def schema_folders(tmp_path) -> dict[str, int]:
    """Each schema folder of model_daily_metrics and how many files it holds."""
    folders = [f.parent.name for f in (tmp_path / "model_daily_metrics").glob("run_date=*/schema-*/*.parquet")]
    return {name: folders.count(name) for name in set(folders)}


def opened_files(warehouse, query: str) -> set[Path]:
    """Every Parquet file DuckDB opens to run query (its FileSystem log), for binding the columns too."""
    with duckdb.connect(str(warehouse), read_only=True) as con:
        con.execute("call enable_logging('FileSystem')")
        con.execute(query).fetchall()
        paths = con.execute(
            "select distinct json_extract_string(message, '$.path') as path from duckdb_logs "
            "where type = 'FileSystem' and json_extract_string(message, '$.op') = 'OPEN'"
        ).fetchall()
    return {Path(path) for (path,) in paths if path.endswith(".parquet")}


def test_files_with_new_columns_get_their_own_schema_folder_and_a_query_opens_one_file_per_folder(tmp_path):
    warehouse, days = tmp_path / "w.duckdb", [date(2026, 1, 1) + timedelta(days=d) for d in range(6)]
    for day in days[:5]:
        publish_metrics(warehouse, day)
    publish_metrics(warehouse, days[5], logloss=0.3)  # an upgrade that adds a column
    assert sorted(schema_folders(tmp_path).values()) == [1, 5]
    assert metrics(warehouse) == [(day, 0.7, None) for day in days[:5]] + [(days[5], 0.7, 0.3)]

    # a view over two folders: to bind, DuckDB opens the first file of each (union_by_name would open all)
    opened = opened_files(warehouse, f"select * from model_daily_metrics where run_date = date '{days[2]}'")
    dates = {f.parent.parent.name.removeprefix("run_date=") for f in opened}
    assert str(days[2]) in dates and dates <= {str(days[0]), str(days[2]), str(days[5])} and len(opened) <= 3


HOLDER = """
import sys
import duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
print("ready", flush=True)
sys.stdin.read()
"""


def test_files_of_a_new_schema_wait_for_the_views_and_nothing_is_deleted_before_they_show(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(warehouse_module, "LOCK_WAIT_SECONDS", 0.5)
    warehouse, day1, day2 = tmp_path / "w.duckdb", date(2026, 1, 1), date(2026, 1, 2)
    publish_metrics(warehouse, day1)
    publish_metrics(warehouse, day2)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(warehouse)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "ready"  # an analyst holds warehouse.duckdb open
        with pytest.raises(ViewsNotUpdatedError, match=r"cannot read model_daily_metrics/run_date=\*/schema-"):
            publish_metrics(warehouse, day2, retention=timedelta(0), logloss=0.3)  # day 2 again, a new column
        assert "not updated" in capsys.readouterr().out
        # the views could not change: they still show day 2's first publish, and no file went
        assert metrics_without_logloss(warehouse) == [(day1, 0.7), (day2, 0.7)]
        assert sorted(schema_folders(tmp_path).values()) == [1, 2]
        publish_metrics(warehouse, day1, retention=timedelta(0))  # same columns: shows at once
        assert sorted(schema_folders(tmp_path).values()) == [1, 3]  # superseded, but the views lag: kept
        assert main(["views", "--warehouse", str(warehouse)]) == 1  # still held
    finally:
        holder.communicate("", timeout=30)

    assert main(["views", "--warehouse", str(warehouse)]) == 0  # the remedy the error names
    assert metrics(warehouse) == [(day1, 0.7, None), (day2, 0.7, 0.3)]  # day 2's newest publish now shows
    publish_metrics(warehouse, day1, retention=timedelta(0))  # the next publish deletes what was superseded
    assert sorted(schema_folders(tmp_path).values()) == [1, 1]  # and every superseded file went
    publish_metrics(warehouse, day1, retention=timedelta(0), logloss=0.2)
    # the old folder held only day 1's superseded file: the views stopped reading it, then it went
    assert list(schema_folders(tmp_path).values()) == [2]
    assert metrics(warehouse) == [(day1, 0.7, 0.2), (day2, 0.7, 0.3)]


def as_before_schema_folders(warehouse) -> None:
    """ad_rankings as adrank wrote it before schema folders: files in the date folders, read by views over
    them with union_by_name (a relative glob literal after the home's folder, as _files_expression wrote)."""
    for path in list(rankings_dir(warehouse).rglob("*.parquet")):
        path.rename(path.parent.parent / path.name)
        path.parent.rmdir()
    with duckdb.connect(str(warehouse)) as con:
        for view in ("ad_rankings", "latest_ad_rankings"):
            con.execute(
                f"create or replace view {view} as select * from read_parquet(case when current_setting("
                f"'temp_directory') = '' then '' else '{warehouse.parent}/' end || 'ad_rankings/run_date=*/*.parquet', "
                "hive_partitioning = true, hive_types = {'run_date': date}, union_by_name = true)"
            )


def test_a_warehouse_from_before_schema_folders_keeps_publishing_then_moves_its_files_in(tmp_path, scores, monkeypatch):
    monkeypatch.setattr(warehouse_module, "LOCK_WAIT_SECONDS", 0.5)
    warehouse, days = tmp_path / "w.duckdb", [date(2026, 1, 1) + timedelta(days=d) for d in range(4)]
    for day in days[:3]:  # as adrank wrote them before schema folders: files in the date folders, one view
        publish_rankings(warehouse, scores(), day, "m", "1", top_n=3)
    as_before_schema_folders(warehouse)
    before = rows(warehouse)
    assert len(opened_files(warehouse, f"select * from ad_rankings where run_date = date '{days[1]}'")) == 3

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(warehouse)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:  # the first publish after the upgrade, an analyst holding the file: the old views must show it
        assert holder.stdout.readline().strip() == "ready"
        publish_rankings(warehouse, scores(), days[3], "m", "2", top_n=3)
        assert {r[0] for r in rows(warehouse)} == set(days)
        assert len(list((tmp_path / "ad_rankings").glob("run_date=*/*.parquet"))) == 4  # beside the old files
    finally:
        holder.communicate("", timeout=30)

    assert main(["views", "--warehouse", str(warehouse)]) == 0  # nobody holding it: files moved, views recreated
    assert not list((tmp_path / "ad_rankings").glob("run_date=*/*.parquet"))  # every file in a schema folder
    assert {r[0] for r in rows(warehouse)} == set(days)
    publish_rankings(warehouse, scores(), days[3], "m", "3", top_n=3)
    assert len(list((tmp_path / "ad_rankings").glob("run_date=*/schema-*/*.parquet"))) == 5
    assert [r for r in rows(warehouse) if r[0] < days[3]] == before
    assert {r[5] for r in rows(warehouse) if r[0] == days[3]} == {"3"}
    opened = opened_files(warehouse, f"select * from ad_rankings where run_date = date '{days[1]}'")
    assert {f.parent.parent.name for f in opened} <= {f"run_date={days[0]}", f"run_date={days[1]}"}


def test_old_files_of_one_table_do_not_hold_up_the_others_while_the_warehouse_is_held(
    tmp_path, scores, monkeypatch, capsys
):
    monkeypatch.setattr(warehouse_module, "LOCK_WAIT_SECONDS", 0.5)
    warehouse, day = tmp_path / "w.duckdb", date(2026, 1, 1)
    publish_rankings(warehouse, scores(), day, "m", "1", top_n=3)
    publish_metrics(warehouse, day)
    as_before_schema_folders(warehouse)
    before = rows(warehouse)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(warehouse)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        capsys.readouterr()
        publish_metrics(warehouse, day, retention=timedelta(0))  # same columns: nothing to recreate
        assert "not updated" not in capsys.readouterr().out  # no wait for the lock, no warning
        assert list(schema_folders(tmp_path).values()) == [1]  # and the superseded file went
        assert main(["views", "--warehouse", str(warehouse)]) == 1  # moving the old files needs the lock
    finally:
        holder.communicate("", timeout=30)
    assert main(["views", "--warehouse", str(warehouse)]) == 0
    assert not list((tmp_path / "ad_rankings").glob("run_date=*/*.parquet"))
    assert rows(warehouse) == before and len(before) == 6  # the old publish, read from its schema folder now


WRITER_HOLDER = """
import sys
import duckdb
con = duckdb.connect(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
"""


def test_nothing_is_deleted_while_another_process_holds_the_warehouse_for_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(warehouse_module, "LOCK_WAIT_SECONDS", 0.5)
    warehouse, day1 = tmp_path / "w.duckdb", date(2026, 1, 1)
    publish_metrics(warehouse, day1)
    holder = subprocess.Popen(
        [sys.executable, "-c", WRITER_HOLDER, str(warehouse)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(ViewsNotUpdatedError):  # the views cannot even be read: the new folder is unread
            publish_metrics(warehouse, day1, retention=timedelta(0), logloss=0.3)
        assert sorted(schema_folders(tmp_path).values()) == [1, 1]
    finally:
        holder.communicate("", timeout=30)
    assert metrics_without_logloss(warehouse) == [(day1, 0.7)]  # the views still work: their folder kept its file
    publish_metrics(warehouse, day1, retention=timedelta(0), logloss=0.4)
    assert metrics(warehouse) == [(day1, 0.7, 0.4)] and list(schema_folders(tmp_path).values()) == [1]


def metrics_without_logloss(warehouse) -> list[tuple]:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        return con.execute("select run_date, auc from model_daily_metrics order by run_date").fetchall()


@pytest.mark.fault
def test_a_publish_removes_only_temp_files_whose_writer_is_gone(tmp_path):
    warehouse = tmp_path / "warehouse.duckdb"
    own = warehouse_module.new_file(warehouse, "ad_rankings", date(2026, 1, 1), datetime(2026, 1, 1))
    folder = own.parent
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = own.name.removesuffix(".tmp").rsplit("-", 1)[1]
    try:
        writing = folder / f".20260101T000000000000-aaaaaaaa.parquet.{running.pid}-{host}.tmp"
        killed = folder / f".20260101T000000000000-bbbbbbbb.parquet.{finished.stdout.strip()}-{host}.tmp"
        elsewhere = folder / f".20260101T000000000000-cccccccc.parquet.{finished.stdout.strip()}-0123abcd.tmp"
        abandoned = folder / ".20250101T000000000000-dddddddd.parquet.tmp"  # before writers were named
        for temp in (writing, killed, elsewhere, abandoned):
            temp.write_bytes(b"half a file")
        week_ago = time.time() - timedelta(days=7).total_seconds()
        os.utime(abandoned, (week_ago, week_ago))
        pq.write_table(pa.table({"x": [1]}), own)
        placed = warehouse_module.place(own)
        assert placed.name == own.name.removeprefix(".").split(".parquet")[0] + ".parquet"
        warehouse_module.new_file(warehouse, "ad_rankings", date(2026, 1, 1), datetime(2026, 1, 2))
        # another process still writing keeps its file, and so does a writer on another machine (too young)
        assert sorted(p.name for p in folder.glob(".*.tmp")) == sorted([writing.name, elsewhere.name])
    finally:
        running.kill()
        running.wait()
