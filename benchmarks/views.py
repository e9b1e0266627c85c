"""Analyst views as dates accumulate: what a query for one run_date reads, and how long it takes.

    python benchmarks/views.py                      # 30 and 365 dates of 20k users x 20 ads, ~1 min on 2 cores
    python benchmarks/views.py --ads 50 --runs 3    # 1 M rows a date (~4 GB of Parquet for 365 dates)

For each number of dates, a home whose ad_rankings holds one publish a date (the first by
publish_rankings, the others copies of it with their run_date) and a rerun of the last date within the
retention (so that date has two files, as after a rerun), then the query of one date,

    select model_version, count(*), round(avg(pctr), 6) from ad_rankings where run_date = <the last date> group by all

through `before` (the view until issue 13: every file listed and opened, the latest publish chosen by a
window over all of them) and `after` (sql/views/ad_rankings.sql: one scan per schema folder, without
union_by_name, the date read from the folder names).
Prints, per view: the Parquet files the scans read (EXPLAIN (ANALYZE, FORMAT json)) and all files DuckDB
opened (its FileSystem log: union_by_name opens every file's footer to bind the schema), the rows the
scans returned and DuckDB's rows_scanned, and the median time of --runs queries, each on a fresh
read-only connection; the same for latest_ad_rankings; and the time DuckDB takes to list the files of the
glob alone. Writes docs/benchmarks/views.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.docs_blocks import DOC, command_line, write_block  # noqa: E402
from tasks.evaluate import to_markdown  # noqa: E402
from tasks.folders import check_replaceable, mark  # noqa: E402
from tasks.publish import publish_rankings  # noqa: E402
from tasks.warehouse import rankings_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
START = date(2026, 1, 1)
ONE_DATE = "select model_version, count(*) as rows, round(avg(pctr), 6) as mean_pctr from {view} {where} group by all"
# ad_rankings and latest_ad_rankings as adrank created them before issue 13 (hive_partitioning = false)
BEFORE_VIEWS = """
create or replace view ad_rankings as
select run_date, user_id, ad_id, rank, pctr, ecpm, model_name, model_version, scored_at
from read_parquet('{glob}', hive_partitioning = false, union_by_name = true)
qualify scored_at = max(scored_at) over (partition by run_date);
create or replace view latest_ad_rankings as
select * from ad_rankings qualify run_date = max(run_date) over ();
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dates", type=int, nargs="+", default=[30, 365], help="numbers of published dates")
    parser.add_argument("--users", type=int, default=20_000, help="users ranked a date")
    parser.add_argument("--ads", type=int, default=20, help="ads ranked per user (ranking.top_n)")
    parser.add_argument("--runs", type=int, default=5, help="timed queries per view (median reported)")
    parser.add_argument("--work", type=Path, default=Path("adrank_home/benchmarks/views"), help="scratch folder")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "views.json", help="result JSON")
    return parser.parse_args()


def staged_scores(path: Path, users: int, ads: int, seed: int) -> Path:
    """Scores as tasks/score.py stages them: every user x ad, a pCTR each."""
    rng = np.random.default_rng(seed)
    table = pa.table(
        {
            "user_id": np.repeat([f"u{u:06d}" for u in range(users)], ads),
            "ad_id": np.tile([f"a{a:04d}" for a in range(ads)], users),
            "pctr": rng.uniform(0.001, 0.2, users * ads),
        }
    )
    pq.write_table(table, path)
    return path


def build_home(home: Path, dates: int, users: int, ads: int) -> Path:
    """A home with `dates` published run_dates and a rerun of the last; returns its warehouse."""
    warehouse = home / "warehouse.duckdb"
    scores = staged_scores(home.parent / f"scores-{dates}.parquet", users, ads, seed=dates)
    publish_rankings(warehouse, scores, START, "adrank-ctr", "1", top_n=ads)
    (first,) = (rankings_dir(warehouse) / f"run_date={START}").glob("schema-*/*.parquet")
    with duckdb.connect() as con:
        for offset in range(1, dates):
            day = START + timedelta(days=offset)
            target = rankings_dir(warehouse) / f"run_date={day}" / first.parent.name / first.name
            target.parent.mkdir(parents=True)
            con.execute(
                f"copy (select * replace (date '{day}' as run_date) from read_parquet('{first}')) to '{target}'"
            )
    publish_rankings(warehouse, scores, START + timedelta(days=dates - 1), "adrank-ctr", "2", top_n=ads)
    before = home / "before.duckdb"
    with duckdb.connect(str(before)) as con:
        con.execute(BEFORE_VIEWS.format(glob=rankings_dir(warehouse) / "run_date=*" / "*" / "*.parquet"))
    return warehouse


def profile(database: Path, query: str) -> dict:
    """Files the Parquet scans opened (of how many listed) and rows they returned, from DuckDB's profile."""
    with duckdb.connect(str(database), read_only=True) as con:
        con.execute("call enable_logging('FileSystem')")  # every file DuckDB opens, for the schema too
        tree = json.loads(con.execute(f"explain (analyze, format json) {query}").fetchone()[1])
        opened = con.execute(
            "select count(distinct json_extract_string(message, '$.path')) from duckdb_logs "
            "where type = 'FileSystem' and json_extract_string(message, '$.op') = 'OPEN' "
            "and json_extract_string(message, '$.path') like '%.parquet'"
        ).fetchone()[0]
    scans, nodes = [], [tree]
    while nodes:
        node = nodes.pop()
        nodes.extend(node.get("children", []))
        if node.get("operator_type") == "TABLE_SCAN":
            scans.append(node)
    return {
        "scans": len(scans),
        "files_scanned": max(int(s["extra_info"]["Total Files Read"]) for s in scans),
        "files_opened": opened,
        "rows_returned": sum(s["operator_cardinality"] for s in scans),
        "rows_scanned": sum(s["operator_rows_scanned"] for s in scans),
    }


def median_seconds(database: Path, query: str, runs: int) -> tuple[float, list]:
    """Median wall time of query over runs fresh read-only connections (as an analyst opens it), and its rows."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        with duckdb.connect(str(database), read_only=True) as con:
            rows = con.execute(query).fetchall()
        times.append(time.perf_counter() - started)
    return statistics.median(times), rows


def measure(warehouse: Path, dates: int, runs: int) -> list[dict]:
    last = START + timedelta(days=dates - 1)
    queries = {
        "ad_rankings": ONE_DATE.format(view="ad_rankings", where=f"where run_date = date '{last}'"),
        "latest_ad_rankings": ONE_DATE.format(view="latest_ad_rankings", where=""),
    }
    files = len(list(rankings_dir(warehouse).rglob("*.parquet")))
    results = []
    for view, query in queries.items():
        answers = {}
        for label, database in (("before", warehouse.with_name("before.duckdb")), ("after", warehouse)):
            seconds, answers[label] = median_seconds(database, query, runs)
            results.append(
                {"dates": dates, "files": files, "view": view, "version": label}
                | profile(database, query)
                | {"median_ms": round(seconds * 1000, 1)}
            )
            print(json.dumps(results[-1]), flush=True)
        assert answers["before"] == answers["after"], answers  # the same rows: the rerun's, whole
        assert [row[0] for row in answers["after"]] == ["2"], answers["after"]
    # what still grows with the dates: DuckDB listing the date folders to expand the views' glob
    listing = f"select count(*) from glob('{rankings_dir(warehouse)}/run_date=*/schema-*/*.parquet')"
    seconds, _ = median_seconds(warehouse, listing, runs)
    results.append({"dates": dates, "files": files, "view": "glob listing only", "median_ms": round(seconds * 1000, 1)})
    print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    args = parse_args()
    work = args.work.resolve()
    check_replaceable(work)  # --work is emptied: never a folder of someone else's
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    mark(work)
    started, results = time.monotonic(), []
    for dates in args.dates:
        home = work / f"home-{dates}"
        home.mkdir(parents=True)
        warehouse = build_home(home, dates, args.users, args.ads)
        print(f"{dates} dates published: {time.monotonic() - started:.0f} s", flush=True)
        results.extend(measure(warehouse, dates, args.runs))
    print(to_markdown(pl.DataFrame(results)))
    result = {
        "users": args.users,
        "ads_per_user": args.ads,
        "rows_per_date": args.users * args.ads,
        "runs": args.runs,
        "duckdb": duckdb.__version__,
        "query": ONE_DATE.format(view="ad_rankings", where="where run_date = <the last date>"),
        "results": results,
        "wall_seconds": round(time.monotonic() - started),
        "command": command_line(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    write_block(DOC, "views", markdown(result), "Published tables: one date's query as the dates grow")
    shutil.rmtree(work, ignore_errors=True)


def markdown(result: dict) -> str:
    """docs/benchmarks.md's block: each view's one-date query by number of dates, files and time."""
    lines = [
        f"Command: `{result['command']}` · DuckDB {result['duckdb']} · {result['users']:,} users × "
        f"{result['ads_per_user']} ads a date · median of {result['runs']} queries; `docs/benchmarks/views.json`",
        "",
        "| dates | files | view | files scanned | files opened | rows scanned (DuckDB) | median time |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["results"]:
        if "version" not in row:  # the glob listing alone
            lines.append(f"| {row['dates']} | | {row['view']} | — | 0 | — | {row['median_ms']:,.0f} ms |")
            continue
        lines.append(
            f"| {row['dates']} | {row['files']} | `{row['view']}` {row['version']} | {row['files_scanned']} | "
            f"{row['files_opened']} | {row['rows_scanned'] / 1e6:,.1f} M | {row['median_ms']:,.0f} ms |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
