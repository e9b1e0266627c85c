"""Timestamps with a time zone: staged once as naive UTC, whatever the zone of the column or the machine."""

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from benchmarks import protocol
from tasks.pairs import build_pairs, build_ranking_inputs
from tests.conftest import write_logs

REPO = Path(__file__).resolve().parents[1]
# 20:30 on 1 January in Los Angeles is 04:30 on 2 January in UTC: the local day is not the UTC day
INSTANTS = [datetime(2026, 1, 2, 4, 30, tzinfo=UTC), datetime(2026, 1, 1, 23, 59, tzinfo=UTC)]
STAGED_SCRIPT = (
    "import json, sys; from tasks.logs import open_logs; "
    "con = open_logs(sys.argv[1]); "
    "print(json.dumps([str(t) for (t,) in con.execute("
    "'select shown_at from stg_impressions order by impression_id').fetchall()]))"
)


def zoned_copy(logs: Path, out: Path, zone: str) -> Path:
    """logs with impressions.ts (naive UTC) as the same instants in zone, written as timestamp with time zone."""
    shutil.copytree(logs, out, ignore=shutil.ignore_patterns("impressions"))
    impressions = pl.read_parquet(logs / "impressions")
    zoned = impressions.with_columns(pl.col("ts").dt.replace_time_zone("UTC").dt.convert_time_zone(zone))
    (out / "impressions").mkdir()
    zoned.write_parquet(out / "impressions" / "part-0.parquet")
    return out


@pytest.mark.fault
@pytest.mark.parametrize("zone", [None, "UTC", "America/Los_Angeles"])
def test_staged_timestamps_are_utc_on_a_machine_in_another_zone(tmp_path, zone):
    rows = [
        {
            "impression_id": i,
            "ts": t if zone else t.replace(tzinfo=None),
            "user_id": "u1",
            "ad_id": "a1",
            "clicked": False,
        }
        for i, t in enumerate(INSTANTS)
    ]
    write_logs(tmp_path / "naive", rows, [{"ad_id": "a1", "title": "Alpha"}], [{"user_id": "u1"}])
    logs = zoned_copy(tmp_path / "naive", tmp_path / "zoned", zone) if zone else tmp_path / "naive"
    if zone:
        assert pl.read_parquet(logs / "impressions").schema["ts"].time_zone == zone
    # DuckDB takes its session zone from the machine: run as a machine in Tokyo would
    staged = subprocess.run(
        [sys.executable, "-c", STAGED_SCRIPT, str(logs)],
        env={**os.environ, "TZ": "Asia/Tokyo"},
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(staged.stdout.splitlines()[-1]) == ["2026-01-02 04:30:00", "2026-01-01 23:59:00"]


def test_zoned_logs_build_the_same_pairs_and_ranking_inputs(tmp_path, make_settings, sample_logs):
    zoned = zoned_copy(sample_logs, tmp_path / "zoned", "America/Los_Angeles")
    naive = build_pairs(make_settings(), tmp_path / "naive-pairs")
    zoned_built = build_pairs(make_settings(data={"logs": str(zoned)}))
    assert (naive.valid_from, naive.test_from) == (zoned_built.valid_from, zoned_built.test_from)
    for split, path in naive.paths.items():
        expected = pl.read_parquet(path).sort("impression_id")
        got = pl.read_parquet(zoned_built.paths[split]).sort("impression_id")
        assert expected.height > 0 and got.equals(expected), split
    # what rerank scores tonight: the same users, histories and ad counts
    ranking = {"run_date": str(zoned_built.test_from.date())}
    naive_inputs = build_ranking_inputs(make_settings(ranking=ranking))
    zoned_inputs = build_ranking_inputs(make_settings(data={"logs": str(zoned)}, ranking=ranking))
    assert naive_inputs.users.height > 0
    assert zoned_inputs.users.sort("user_id").equals(naive_inputs.users.sort("user_id"))
    assert zoned_inputs.ads.sort("ad_id").equals(naive_inputs.ads.sort("ad_id"))


def test_the_benchmark_holds_out_the_same_impressions_of_zoned_logs(tmp_path, sample_logs):
    zoned = zoned_copy(sample_logs, tmp_path / "zoned", "America/Los_Angeles")
    impressions = pl.read_parquet(sample_logs / "impressions")
    test_from = impressions["ts"].max()  # naive UTC, as adrank stages it: all but the last are held out
    naive_cold = protocol.hold_out_items(sample_logs, tmp_path / "naive-out", seed=3, test_from=test_from)
    zoned_cold = protocol.hold_out_items(zoned, tmp_path / "zoned-out", seed=3, test_from=test_from)
    assert zoned_cold == naive_cold
    kept = pl.read_parquet(tmp_path / "naive-out" / "impressions")["impression_id"].sort()
    assert kept.len() < impressions.height
    assert pl.read_parquet(tmp_path / "zoned-out" / "impressions")["impression_id"].sort().equals(kept)
