import hashlib
import hmac
import json
import shutil
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from tasks import table_history, warehouse_upgrade
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
from tasks.warehouse import VIEWS
from tests.conftest import staged, write_logs


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
    assert len(list((tmp_path / "ad_rankings" / "run_date=2026-01-01").glob("*.parquet"))) == 1


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
    # the reader saw a later publish too (publish 0 itself may be gone before its first read on a slow machine)
    assert {s[0][2] for s in snapshots} - {"0"}
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
    with pytest.raises(AssertionError, match="does not exist"):  # attached, without file_search_path
        count_views(moved / "warehouse.duckdb", elsewhere, how="attach")


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


def data_files(tmp_path, table: str, partition: str = "") -> list[Path]:
    """The Parquet data files in a table's folder (of one partition folder, if named), referenced or not."""
    return [f for f in (tmp_path / table).glob(f"{partition or '*=*'}/*.parquet")]


@pytest.mark.parametrize("table", ["ad_rankings", "model_daily_metrics", "input_drift", "ad_daily_ctr"])
def test_a_query_for_one_date_reads_only_that_dates_file_and_its_latest_publish(tmp_path, table):
    warehouse, days = tmp_path / "w.duckdb", [date(2026, 1, 1) + timedelta(days=d) for d in range(5)]
    key = "impression_date" if table == "ad_daily_ctr" else "run_date"
    publish_days(warehouse, table, days, "1")
    publish_days(warehouse, table, days if table == "ad_daily_ctr" else [days[2]], "2")  # a rerun, within retention
    folder = tmp_path / table / f"{key}={days[2]}"
    assert len(data_files(tmp_path, table, folder.name)) == 2  # the superseded publish is kept for retention

    scans = table_scans(warehouse, f"select * from {table} where {key} = date '{days[2]}'")
    per_day = 2 if table == "ad_daily_ctr" else 4
    assert len(scans) == 1 and scans[0]["files_read"] == 1 and scans[0]["rows"] == per_day
    assert scans[0]["files"][0].parent.name == folder.name  # the date's newest publish only

    with duckdb.connect(str(warehouse), read_only=True) as con:
        version = "clicks" if table == "ad_daily_ctr" else "model_version"
        got = con.execute(
            f"select {key}, count(*), min({version}), max({version}) from {table} group by 1 order by 1"
        ).fetchall()
    if table == "ad_daily_ctr":  # every day republished: a's clicks 1 -> 2
        assert got == [(day, 2, 0, 2) for day in days]
    else:  # the rerun date whole from its latest publish, the others untouched
        assert got == [(day, per_day, *(("2", "2") if day == days[2] else ("1", "1"))) for day in days]


def test_superseded_publishes_and_files_of_killed_writers_are_vacuumed_after_the_retention(tmp_path, scores):
    warehouse, day = tmp_path / "w.duckdb", date(2026, 1, 1)
    publish_rankings(warehouse, scores(), day, "m", "1", top_n=3)
    publish_rankings(warehouse, scores(), day, "m", "2", top_n=3)
    assert len(data_files(tmp_path, "ad_rankings")) == 2  # the first is kept: time travel and unpublish read it
    stray = tmp_path / "ad_rankings" / f"run_date={day}" / "part-00000-left-by-a-killed-writer.parquet"
    pq.write_table(pa.table({"x": [1]}), stray)
    publish_rankings(warehouse, scores(), day, "m", "3", top_n=3, retention=timedelta(0))
    assert len(data_files(tmp_path, "ad_rankings")) == 1 and not stray.exists()
    assert {r[5] for r in rows(warehouse)} == {"3"}


def test_the_log_is_checkpointed_so_a_reader_replays_few_commits(tmp_path, scores):
    warehouse = tmp_path / "w.duckdb"
    for republish in range(warehouse_module.CHECKPOINT_INTERVAL + 1):
        publish_rankings(warehouse, scores(), date(2026, 1, 1 + republish % 3), "m", str(republish), top_n=3)
    log = tmp_path / "ad_rankings" / "_delta_log"
    assert list(log.glob("*.checkpoint.parquet"))  # a reader starts there, not at commit 0
    assert len(rows(warehouse)) == 18


def metrics(warehouse, columns: str = "run_date, auc, logloss") -> list[tuple]:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        return con.execute(f"select {columns} from model_daily_metrics order by run_date").fetchall()


def publish_metrics(warehouse, day: date, retention: timedelta = timedelta(hours=1), **extra: float) -> None:
    """A model_daily_metrics publish of day (auc, and any extra columns: a new schema)."""
    frame = pl.DataFrame({"run_date": [day], "model_version": ["1"], "slice": ["overall"], "auc": [0.7], **extra})
    publish_monitoring(warehouse, day, {"model_daily_metrics": frame}, retention=retention)


HOLDER = """
import sys
import duckdb
con = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == "read_only")
print("ready", flush=True)
for line in sys.stdin:  # each line: a query; its rows back as one line
    print(repr(con.execute(line).fetchall()), flush=True)
"""


@pytest.mark.fault
@pytest.mark.parametrize("mode", ["read_only", "read_write"])
def test_a_held_warehouse_never_blocks_a_publish_even_one_with_a_new_column(tmp_path, mode, monkeypatch):
    monkeypatch.setattr(warehouse_module, "LOCK_WAIT_SECONDS", 30)  # a publish that waited would show in the time
    warehouse, day1, day2 = tmp_path / "w.duckdb", date(2026, 1, 1), date(2026, 1, 2)
    publish_metrics(warehouse, day1)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(warehouse), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:  # an analyst holds warehouse.duckdb (DuckDB's CLI opens it read-write unless told otherwise)
        assert holder.stdout.readline().strip() == "ready"
        started = time.monotonic()
        publish_metrics(warehouse, day2, logloss=0.3)  # a new column: an upgrade of the monitor
        publish_metrics(warehouse, day1, retention=timedelta(0), logloss=0.2)
        assert time.monotonic() - started < 10
        holder.stdin.write("select run_date::varchar, auc, logloss from model_daily_metrics order by run_date\n")
        holder.stdin.flush()  # the analyst's open connection sees the new column and both dates, no reconnect
        assert holder.stdout.readline().strip() == "[('2026-01-01', 0.7, 0.2), ('2026-01-02', 0.7, 0.3)]"
    finally:
        holder.communicate("", timeout=30)
    assert metrics(warehouse) == [(day1, 0.7, 0.2), (day2, 0.7, 0.3)]


def test_time_travel_reads_a_date_as_it_was_published_at_a_version_or_a_time(tmp_path, scores):
    warehouse, day = tmp_path / "w.duckdb", date(2026, 1, 1)
    publish_rankings(warehouse, scores(), day, "m", "1", top_n=3)
    between = datetime.now(UTC)
    time.sleep(0.05)
    publish_rankings(warehouse, scores(0.01), day, "m", "2", top_n=3)
    assert user_rankings(warehouse, "u1", day, None)["model_version"].unique().to_list() == ["2"]
    assert user_rankings(warehouse, "u1", day, None, as_of=0)["ad_id"].to_list() == ["a", "b", "c"]
    assert user_rankings(warehouse, "u1", day, None, as_of=between)["model_version"].unique().to_list() == ["1"]
    with pytest.raises(LookupError, match="has versions 0 to 1, not 7"):
        user_rankings(warehouse, "u1", day, None, as_of=7)
    with pytest.raises(LookupError, match="oldest version kept is from"):
        user_rankings(warehouse, "u1", day, None, as_of=datetime(2020, 1, 1, tzinfo=UTC))
    assert main(["rankings", "--user", "u1", "--date", str(day), "--as-of", "0", "--warehouse", str(warehouse)]) == 0
    assert main(["rankings", "--user", "u1", "--as-of", "yesterday", "--warehouse", str(warehouse)]) == 2


def test_unpublish_restores_a_dates_publish_before_the_latest_and_can_be_undone(tmp_path, scores):
    warehouse, day1, day2 = tmp_path / "w.duckdb", date(2026, 1, 1), date(2026, 1, 2)
    publish_rankings(warehouse, scores(), day1, "m", "1", top_n=3)
    publish_rankings(warehouse, scores(), day2, "m", "1", top_n=3)
    publish_rankings(warehouse, scores(0.01), day1, "m", "2", top_n=3)  # a bad night's rerun of day 1
    publish_rankings(warehouse, scores(), day2, "m", "3", top_n=3)  # later publishes of other dates stay
    assert main(["unpublish", "--date", str(day1), "--warehouse", str(warehouse)]) == 0
    versions = {(r[0], r[5]) for r in rows(warehouse)}
    assert versions == {(day1, "1"), (day2, "3")} and len(rows(warehouse)) == 12
    assert table_history.unpublish(warehouse, "ad_rankings", str(day1)) > 0  # the undo, undone
    assert {(r[0], r[5]) for r in rows(warehouse)} == {(day1, "2"), (day2, "3")}

    day3 = date(2026, 1, 3)
    publish_rankings(warehouse, scores(), day3, "m", "4", top_n=3)
    table_history.unpublish(warehouse, "ad_rankings", str(day3))  # its only publish: the date goes
    assert {r[0] for r in rows(warehouse)} == {day1, day2}
    assert main(["unpublish", "--date", str(day3), "--warehouse", str(warehouse)]) == 1  # nothing there now


def test_unpublish_after_the_retention_changes_nothing(tmp_path, scores):
    warehouse, day = tmp_path / "w.duckdb", date(2026, 1, 1)
    publish_rankings(warehouse, scores(), day, "m", "1", top_n=3)
    publish_rankings(warehouse, scores(), day, "m", "2", top_n=3, retention=timedelta(0))  # version 1's file went
    before = rows(warehouse)
    with pytest.raises(table_history.NoEarlierPublishError, match="vacuumed"):
        table_history.unpublish(warehouse, "ad_rankings", str(day))
    assert rows(warehouse) == before
    with pytest.raises(LookupError, match="past the retention"):  # nor can time travel read it
        user_rankings(warehouse, "u1", day, None, as_of=0)


def write_old_layout(tmp_path, warehouse) -> None:
    """A warehouse as adrank wrote it before Delta Lake: ad_rankings files per date, in schema folders (two
    publishes of 2025-12-31, the newer without ecpm's column as before ecpm existed) or directly in the date
    folder (before schema folders), a temp file of a killed writer, model_daily_metrics, and views over them."""

    def ranking(day: str, version: str, pctr: float) -> pa.Table:
        return pa.table(
            {
                "run_date": pa.array([date.fromisoformat(day)] * 2),
                "user_id": ["u9", "u8"],
                "ad_id": ["z", "z"],
                "rank": pa.array([1, 1], pa.int32()),
                "pctr": [pctr, pctr],
                "model_name": ["m", "m"],
                "model_version": [version, version],
                "scored_at": pa.array([datetime(2026, 1, 1)] * 2, pa.timestamp("us")),
            }
        )

    old = {
        "ad_rankings/run_date=2025-12-31/schema-aaaa/20251231T010000000000-x.parquet": ranking("2025-12-31", "0", 0.1),
        "ad_rankings/run_date=2025-12-31/schema-bbbb/20251231T020000000000-y.parquet": ranking("2025-12-31", "1", 0.9),
        "ad_rankings/run_date=2025-12-30/20251230T010000000000-z.parquet": ranking("2025-12-30", "0", 0.5),
        "model_daily_metrics/run_date=2025-12-31/schema-cccc/20251231T030000000000-m.parquet": pa.table(
            {"model_version": ["1"], "slice": ["overall"], "auc": [0.7]}  # the date only in the folder name
        ),
    }
    for name, table in old.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp_path / name)
    (tmp_path / "ad_rankings/run_date=2025-12-31/.20251231T040000000000-k.parquet.123-abcd.tmp").write_bytes(b"half")
    with duckdb.connect(str(warehouse)) as con:
        for view, table in (("ad_rankings", "ad_rankings"), ("model_daily_metrics", "model_daily_metrics")):
            glob = tmp_path / table / "run_date=*" / "**" / "*.parquet"
            con.execute(
                f"create view {view} as select * from read_parquet('{glob}', hive_partitioning = true, "
                "union_by_name = true)"
            )


def test_a_warehouse_of_the_hand_made_layout_is_moved_to_delta_once(tmp_path, scores, monkeypatch):
    monkeypatch.setattr(warehouse_module, "LOCK_WAIT_SECONDS", 0.5)
    warehouse = tmp_path / "w.duckdb"
    write_old_layout(tmp_path, warehouse)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(warehouse), "read_only"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:  # the upgrade needs warehouse.duckdb for a moment: held, nothing is published and nothing is lost
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(warehouse_upgrade.WarehouseUpgradeError, match="close the other connections"):
            publish_rankings(warehouse, scores(), date(2026, 1, 1), "m", "2", top_n=3)
    finally:
        holder.communicate("", timeout=30)
    assert len(list(tmp_path.glob("*/run_date=*/**/[0-9]*.parquet"))) == 4  # the old files, untouched
    assert not list(tmp_path.glob("*/_delta_log"))  # and no Delta table begun

    ecpm = staged(
        pa.table({"user_id": ["u1", "u1"], "ad_id": ["a", "b"], "pctr": [0.4, 0.1], "ecpm": [400.0, 900.0]}),
        tmp_path,
    )
    publish_rankings(warehouse, ecpm, date(2026, 1, 1), "m", "2", top_n=3, objective="ecpm")
    with duckdb.connect(str(warehouse), read_only=True) as con:
        got = con.execute("select run_date, user_id, rank, ad_id, ecpm, model_version from ad_rankings order by all")
        assert got.fetchall() == [
            (date(2025, 12, 30), "u8", 1, "z", None, "0"),
            (date(2025, 12, 30), "u9", 1, "z", None, "0"),
            (date(2025, 12, 31), "u8", 1, "z", None, "1"),  # the date's newest publish only
            (date(2025, 12, 31), "u9", 1, "z", None, "1"),
            (date(2026, 1, 1), "u1", 1, "b", 900.0, "2"),  # ranked by ecpm
            (date(2026, 1, 1), "u1", 2, "a", 400.0, "2"),
        ]
    assert metrics(warehouse, "run_date, auc") == [(date(2025, 12, 31), 0.7)]
    assert not list(tmp_path.glob("*/run_date=*/schema-*")) and not list(tmp_path.glob("*/run_date=*/.*.tmp"))
    assert not list(tmp_path.glob("*/run_date=*/[0-9]*.parquet"))
    assert main(["views", "--warehouse", str(warehouse)]) == 0


def test_an_upgrade_killed_while_deleting_the_old_files_finishes_without_going_back_a_publish(tmp_path, scores):
    warehouse = tmp_path / "w.duckdb"
    write_old_layout(tmp_path, warehouse)
    newest = tmp_path / "ad_rankings/run_date=2025-12-31/schema-bbbb/20251231T020000000000-y.parquet"
    # as the upgrade leaves it when killed after converting 2025-12-31 and deleting that date's newest file
    warehouse_upgrade._write_old_partition(warehouse, "ad_rankings", "2025-12-31", pq.read_table(newest))
    newest.unlink()
    assert main(["views", "--warehouse", str(warehouse)]) == 0  # the rerun
    with duckdb.connect(str(warehouse), read_only=True) as con:
        got = con.execute("select run_date, min(model_version), max(model_version) from ad_rankings group by 1")
        assert sorted(got.fetchall()) == [(date(2025, 12, 30), "0", "0"), (date(2025, 12, 31), "1", "1")]
    assert not list(tmp_path.glob("*/run_date=*/schema-*"))


@pytest.mark.fault
def test_a_first_publish_while_an_analyst_holds_the_file_for_writing_goes_on_without_its_views(
    tmp_path, scores, monkeypatch, capsys
):
    monkeypatch.setattr(warehouse_module, "LOCK_WAIT_SECONDS", 0.5)
    warehouse, day = tmp_path / "w.duckdb", date(2026, 1, 1)
    publish_metrics(warehouse, day)  # warehouse.duckdb exists, with model_daily_metrics' view only
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(warehouse), "read_write"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert publish_rankings(warehouse, scores(), day, "m", "1", top_n=3) == 6  # ad_rankings' first publish
        assert "views not checked" in capsys.readouterr().out  # published all the same, the views left for later
        assert main(["views", "--warehouse", str(warehouse)]) == 1  # still held
    finally:
        holder.communicate("", timeout=30)
    assert main(["views", "--warehouse", str(warehouse)]) == 0
    assert len(rows(warehouse)) == 6 and len(rows(warehouse, "latest_ad_rankings")) == 6


def test_housekeeping_that_fails_after_the_commit_is_a_warning_not_a_failed_publish(
    tmp_path, scores, monkeypatch, capsys
):
    warehouse, day = tmp_path / "w.duckdb", date(2026, 1, 1)
    publish_rankings(warehouse, scores(), day, "m", "1", top_n=3)

    def vacuum_fails(delta, retention):
        raise OSError("disk unreachable")

    monkeypatch.setattr(warehouse_module, "vacuum", vacuum_fails)
    assert publish_rankings(warehouse, scores(), day, "m", "2", top_n=3) == 6  # no retry would publish it twice
    assert "housekeeping failed: disk unreachable" in capsys.readouterr().out
    assert {r[5] for r in rows(warehouse)} == {"2"}
