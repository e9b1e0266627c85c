"""Analyst views as dates accumulate: what a query for one run_date reads, and how long it takes.

    python benchmarks/views.py                      # 30 and 365 dates of 20k users x 20 ads
    python benchmarks/views.py --dates 30 365 1000 --runs 3   # the table in docs/benchmarks.md

For each number of dates, a home whose ad_rankings (a Delta table) got one publish a date, each its own
commit as the nightly rerank makes them (the first by publish_rankings, the others the same rows with
their run_date, through tasks/warehouse.py write_partitions), and a rerun of the last date within the
retention (so that date has two files, as after a rerun), then the query of one date,

    select model_version, count(*), round(avg(pctr), 6) from ad_rankings where run_date = <the last date> group by all

and the same of latest_ad_rankings. Prints, per view: the Parquet files the scans read (EXPLAIN (ANALYZE,
FORMAT json)) and all Parquet files DuckDB opened (its FileSystem log: data files and Delta checkpoints),
the rows the scans returned and DuckDB's rows_scanned, and the median time of --runs queries, each on a
fresh read-only connection; and the median time of the last --runs publishes (write and vacuum) at that
many dates. Writes docs/benchmarks/views.json.
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
from tasks.warehouse import open_table, table_path, write_partitions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
START = date(2026, 1, 1)
ONE_DATE = "select model_version, count(*) as rows, round(avg(pctr), 6) as mean_pctr from {view} {where} group by all"
RETENTION = timedelta(hours=1)  # ranking.superseded_retention_minutes' minimum: nothing here is old enough to go


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


def build_home(home: Path, dates: int, users: int, ads: int, runs: int) -> tuple[Path, list[float]]:
    """A home with `dates` published run_dates, one commit each, and a rerun of the last; returns its
    warehouse and the seconds of the last `runs` publishes (each a commit and a vacuum)."""
    warehouse = home / "warehouse.duckdb"
    scores = staged_scores(home.parent / f"scores-{dates}.parquet", users, ads, seed=dates)
    publish_rankings(warehouse, scores, START, "adrank-ctr", "1", top_n=ads)
    first = open_table(warehouse, "ad_rankings").to_pyarrow_table()
    seconds = []
    for offset in range(1, dates):
        day = pa.array([START + timedelta(days=offset)] * len(first), pa.date32())
        rows = first.set_column(first.schema.get_field_index("run_date"), "run_date", day)
        started = time.perf_counter()
        write_partitions(warehouse, "ad_rankings", rows, RETENTION)
        seconds.append(time.perf_counter() - started)
    publish_rankings(warehouse, scores, START + timedelta(days=dates - 1), "adrank-ctr", "2", top_n=ads)
    return warehouse, seconds[-runs:]


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


def median_seconds(database: Path, query: str, runs: int) -> tuple[float, float, list]:
    """Median wall time of query over runs fresh read-only connections (as an analyst opens it: DuckDB loads
    the delta extension once per connection), the median of the query alone on those connections once the
    extension is loaded (a session kept open, a BI tool's pool), and its rows."""
    fresh, loaded = [], []
    for _ in range(runs):
        started = time.perf_counter()
        with duckdb.connect(str(database), read_only=True) as con:
            rows = con.execute(query).fetchall()
            fresh.append(time.perf_counter() - started)
            started = time.perf_counter()
            con.execute(query).fetchall()
            loaded.append(time.perf_counter() - started)
    return statistics.median(fresh), statistics.median(loaded), rows


def measure(warehouse: Path, dates: int, runs: int, publish_seconds: list[float]) -> list[dict]:
    last = START + timedelta(days=dates - 1)
    queries = {
        "ad_rankings": ONE_DATE.format(view="ad_rankings", where=f"where run_date = date '{last}'"),
        "latest_ad_rankings": ONE_DATE.format(view="latest_ad_rankings", where=""),
    }
    files = len(list(table_path(warehouse, "ad_rankings").glob("run_date=*/*.parquet")))
    results = []
    for view, query in queries.items():
        seconds, open_seconds, answer = median_seconds(warehouse, query, runs)
        assert [row[0] for row in answer] == ["2"] and answer[0][1] > 0, answer  # the rerun's rows, whole
        results.append(
            {"dates": dates, "files": files, "view": view}
            | profile(warehouse, query)
            | {"median_ms": round(seconds * 1000, 1), "open_connection_ms": round(open_seconds * 1000, 1)}
        )
        print(json.dumps(results[-1]), flush=True)
    publish_ms = round(statistics.median(publish_seconds) * 1000, 1) if publish_seconds else None
    results.append({"dates": dates, "files": files, "view": "a publish (commit and vacuum)", "median_ms": publish_ms})
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
        warehouse, publish_seconds = build_home(home, dates, args.users, args.ads, args.runs)
        print(f"{dates} dates published: {time.monotonic() - started:.0f} s", flush=True)
        results.extend(measure(warehouse, dates, args.runs, publish_seconds))
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
        "| dates | files | view | files scanned | files opened | rows scanned (DuckDB) | fresh connection "
        "| open connection |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["results"]:
        if "scans" not in row:  # a publish
            lines.append(
                f"| {row['dates']} | {row['files']} | {row['view']} | — | — | — | {row['median_ms']:,.0f} ms | |"
            )
            continue
        lines.append(
            f"| {row['dates']} | {row['files']} | `{row['view']}` | {row['files_scanned']} | "
            f"{row['files_opened']} | {row['rows_scanned'] / 1e6:,.1f} M | {row['median_ms']:,.0f} ms | "
            f"{row['open_connection_ms']:,.0f} ms |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
