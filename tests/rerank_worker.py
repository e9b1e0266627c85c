"""A rerank process for the kill tests: scores synthetic users x ads with a model folder, then publishes.

    python -m tests.rerank_worker <model_dir> <work_dir> <model_version> [--republish N]

With --republish N it publishes the scores N times more, as versions <model_version>.1 .. .N, printing
"publishing" before each: the test kills it in the middle of those publishes.
"""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path

import polars as pl
import torch

from tasks import publish
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


def main(model_dir: str, work: Path, version: str, republish: int) -> None:
    model, tokenizer = load_cross_encoder(model_dir, torch.device("cpu"))
    ranker = RankingModel(model, tokenizer, Calibration(slope=50.0), None, max_length=32, batch_size=16)
    scores = work / "staging" / "scores.parquet"
    score_candidates(ranker, inputs(), RankingConfig(top_n=TOP_N, user_chunk_size=8, candidates_k=None), scores)
    publish.publish_rankings(work / "warehouse.duckdb", scores, RUN_DATE, "m", version, top_n=TOP_N)
    print("published", flush=True)
    for again in range(1, republish + 1):
        print("publishing", flush=True)
        publish.publish_rankings(work / "warehouse.duckdb", scores, RUN_DATE, "m", f"{version}.{again}", top_n=TOP_N)


if __name__ == "__main__":
    flags = sys.argv[4:]
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(flags[1]) if flags[:1] == ["--republish"] else 0)
