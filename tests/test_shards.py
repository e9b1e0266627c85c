"""Sharded scoring (tasks/shards.py): the real rerank flow on a Dask LocalCluster of 2 worker processes on
loopback, against the in-process run of the same model, date and config."""

from __future__ import annotations

import os
import signal
import threading
from datetime import date
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

pytest.importorskip("prefect_dask")
from distributed import Client, LocalCluster, WorkerPlugin

from flows.rerank import rerank
from tasks.pairs import RankingInputs
from tasks.shards import split_users

pytestmark = pytest.mark.distributed

RUN_DATE = "2026-05-10"
# two-stage (k 3 < 4 ads), several user chunks: stage-1 terms cached per worker, shards of whole chunks
RANKING = {"top_n": 2, "candidates_k": 3, "active_window_days": 3, "run_date": RUN_DATE, "user_chunk_size": 4}


def overrides(settings, home: Path, **ranking) -> dict:
    """first_retrain's model and logs, with the warehouse and staging of a home of this test's own."""
    return settings.model_dump(mode="json") | {
        "home": str(home),
        "warehouse": str(home / "warehouse.duckdb"),
        "ranking": RANKING | ranking,
    }


def published(warehouse: Path) -> pl.DataFrame:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        return con.execute(
            "select user_id, ad_id, rank, pctr from ad_rankings where run_date = ? order by user_id, rank",
            [date.fromisoformat(RUN_DATE)],
        ).pl()


def assert_same_rows(rows: pl.DataFrame, reference: pl.DataFrame) -> None:
    assert rows.select("user_id", "ad_id").is_unique().all()
    assert rows.select("user_id", "ad_id", "rank").to_dicts() == reference.select("user_id", "ad_id", "rank").to_dicts()
    np.testing.assert_allclose(rows["pctr"].to_numpy(), reference["pctr"].to_numpy(), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def reference(first_retrain, tmp_path_factory) -> pl.DataFrame:
    """The in-process run's rows (shards 1, the local runner: the path rerank takes by default)."""
    settings, _ = first_retrain
    home = tmp_path_factory.mktemp("in-process")
    summary = rerank(overrides=overrides(settings, home))
    assert summary["two_stage"] and summary["rows"] == summary["users"] * 2
    return published(home / "warehouse.duckdb")


@pytest.fixture
def cluster():
    """Two single-threaded worker processes on loopback, each restarted by its nanny if killed."""
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as local:
        yield local


class KillFirstShardWorker(WorkerPlugin):
    """SIGKILLs the worker process that starts the cluster's first task, `delay` seconds in (the model is
    still loading or the shard scoring); the marker file makes it once per cluster and records the pid."""

    def __init__(self, marker: str, delay: float):
        self.marker, self.delay = marker, delay

    def transition(self, key, start, finish, **kwargs):
        if finish != "executing":
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        threading.Timer(self.delay, os.kill, (os.getpid(), signal.SIGKILL)).start()


def test_split_users_keeps_whole_chunks_and_their_candidates():
    users = pl.DataFrame({"user_id": [f"u{i:02d}" for i in range(10)], "user_text": ["t"] * 10})
    candidates = pl.DataFrame({"user_id": ["u00", "u05", "u09"], "ad_id": ["a", "a", "b"]})
    inputs = RankingInputs(date(2026, 1, 1), users, pl.DataFrame({"ad_id": ["a", "b"]}), candidates)
    pieces = split_users(inputs, shards=4, chunk_size=3)  # 4 chunks of 3, 3, 3, 1 users
    assert [p.users.height for p in pieces] == [3, 3, 3, 1]
    assert pl.concat([p.users for p in pieces]).equals(users)
    assert [p.candidates["user_id"].to_list() for p in pieces] == [["u00"], ["u05"], [], ["u09"]]
    assert [p.users.height for p in split_users(inputs, shards=3, chunk_size=2)] == [4, 4, 2]
    assert [p.users.height for p in split_users(inputs, shards=8, chunk_size=64)] == [10]  # one chunk: one shard


def test_sharded_rerank_on_dask_publishes_the_in_process_rows(first_retrain, reference, cluster, tmp_path):
    settings, _ = first_retrain
    summary = rerank(
        overrides=overrides(settings, tmp_path, shards=4, task_runner="dask", dask_address=cluster.scheduler_address)
    )
    assert summary["rows"] == reference.height and summary["two_stage"]
    shard_files = sorted(p.name for p in (tmp_path / "staging" / f"ad_rankings-{RUN_DATE}").iterdir())
    assert len(shard_files) > 1 and shard_files == [f"shard-{i}.parquet" for i in range(len(shard_files))]
    assert_same_rows(published(tmp_path / "warehouse.duckdb"), reference)


@pytest.mark.fault
def test_a_worker_killed_mid_run_still_publishes_the_whole_date(first_retrain, reference, cluster, tmp_path):
    settings, _ = first_retrain
    marker = tmp_path / "killed-worker.pid"
    with Client(cluster.scheduler_address) as client:
        client.register_plugin(KillFirstShardWorker(str(marker), delay=0.3))
    summary = rerank(
        overrides=overrides(settings, tmp_path, shards=4, task_runner="dask", dask_address=cluster.scheduler_address)
    )
    killed = int(marker.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)  # the worker that started the first shard is gone; its shard ran again elsewhere
    assert summary["rows"] == reference.height
    assert_same_rows(published(tmp_path / "warehouse.duckdb"), reference)
