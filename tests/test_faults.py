"""Fault injection: processes killed mid-run, and what a rerun leaves behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

REPO = Path(__file__).resolve().parents[1]


def worker(model_dir: Path, work: Path, version: str, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "tests.rerank_worker", str(model_dir), str(work), version, *flags]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)


def published(work: Path) -> list[tuple]:
    """ad_rankings as an analyst sees it, without scored_at."""
    with duckdb.connect(str(work / "warehouse.duckdb"), read_only=True) as con:
        return con.execute(
            "select run_date, user_id, ad_id, rank, pctr, model_version from ad_rankings order by user_id, rank"
        ).fetchall()


def wait_for(path_glob, folder: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list(folder.glob(path_glob)):
        assert time.monotonic() < deadline, f"{path_glob} never appeared in {folder}"
        time.sleep(0.01)


@pytest.mark.fault
def read_until(process, wanted: str) -> bool:
    """Read the process's output lines (model loading and progress come first) until `wanted`; False at EOF."""
    return any(line.strip() == wanted for line in process.stdout)


def test_rerank_killed_mid_scoring_or_mid_publish_leaves_a_whole_publish_and_a_rerun_completes(
    tmp_path, tiny_model_dir
):
    # reference: one uninterrupted run
    reference = tmp_path / "reference"
    assert worker(tiny_model_dir, reference, "1").wait(timeout=300) == 0
    expected = published(reference)
    assert len(expected) == 600 * 5 and len(set(expected)) == len(expected)

    # yesterday's rankings for the date are in place (version 0) before the night's run
    work = tmp_path / "work"
    assert worker(tiny_model_dir, work, "0").wait(timeout=300) == 0
    before = published(work)
    assert {row[5] for row in before} == {"0"}

    # 1. SIGKILL in the middle of scoring: chunks are being appended to the staged file
    process = worker(tiny_model_dir, work, "1")
    wait_for("scores.parquet.tmp", work / "staging")
    time.sleep(1.0)
    assert process.poll() is None, "the run ended before the kill"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert published(work) == before

    # 2. SIGKILL in the middle of publishes of the date (after scoring, at moments spread over a publish):
    # the date shows one whole publish, whichever one committed last
    for delay in (0.0, 0.02, 0.05, 0.1):
        process = worker(tiny_model_dir, work, "1", "--republish", "1000")
        assert read_until(process, "publishing"), "the worker ended before publishing"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        shown = published(work)
        versions = {row[5] for row in shown}
        assert len(versions) == 1 and len(shown) == len(expected)  # one publish, all of its rows
        assert [row[:5] for row in shown] == [row[:5] for row in expected]

    # 3. the rerun publishes exactly what an uninterrupted run does; nothing duplicated, nothing left over
    assert worker(tiny_model_dir, work, "1").wait(timeout=300) == 0
    assert published(work) == expected
