"""A rerank process for the kill tests: scores synthetic users x ads with a model folder, then publishes.

    python -m tests.rerank_worker <model_dir> <work_dir> <model_version> [--pause-before-commit]

With --pause-before-commit it prints "committing" once the new rankings file is fully written under its
hidden name, then waits: the test kills it there, at the last moment before the rename that publishes.
"""

from __future__ import annotations

import sys
import time
from datetime import date
from pathlib import Path

import polars as pl
import torch

from tasks import publish, warehouse
from tasks.config import RankingConfig
from tasks.model import Calibration, load_cross_encoder
from tasks.pairs import RankingInputs
from tasks.score import RankingModel, score_candidates

RUN_DATE = date(2026, 1, 1)
USERS, ADS, TOP_N = 600, 40, 5


def inputs() -> RankingInputs:
    users = pl.DataFrame(
        {
            "user_id": [f"u{i:04d}" for i in range(USERS)],
            "user_text": [f"age: {18 + i % 60}, id {i}" for i in range(USERS)],
        }
    )
    ads = pl.DataFrame(
        {"ad_id": [f"a{j:02d}" for j in range(ADS)], "ad_text": [f"offer number {j}" for j in range(ADS)]}
    )
    return RankingInputs(RUN_DATE, users, ads)


def main(model_dir: str, work: Path, version: str, pause: bool) -> None:
    model, tokenizer = load_cross_encoder(model_dir, torch.device("cpu"))
    ranker = RankingModel(model, tokenizer, Calibration(slope=50.0), None, max_length=32, batch_size=16)
    scores = work / "staging" / "scores.parquet"
    score_candidates(ranker, inputs(), RankingConfig(top_n=TOP_N, user_chunk_size=8, candidates_k=None), scores)
    if pause:
        rename = warehouse._durable_rename

        def pause_then_rename(tmp: Path, target: Path) -> None:
            print("committing", flush=True)
            time.sleep(600)
            rename(tmp, target)

        warehouse._durable_rename = pause_then_rename
    publish.publish_rankings(work / "warehouse.duckdb", scores, RUN_DATE, "m", version, top_n=TOP_N)
    print("published", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], "--pause-before-commit" in sys.argv)
