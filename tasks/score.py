"""Score every (active user, active ad) pair with a registered model and keep each user's top ads."""

from __future__ import annotations

import mlflow
import polars as pl
import pyarrow as pa

from tasks.pairs import RankingInputs
from tasks.registry import predict_pctr


def score_candidates(
    model: mlflow.pyfunc.PyFuncModel, inputs: RankingInputs, user_chunk_size: int, top_n: int
) -> pa.Table:
    """(user_id, ad_id, pctr) for each user's top_n ads, scored chunk by chunk of users.

    Memory stays at one chunk of pairs plus users x top_n results.
    """
    kept = []
    for start in range(0, inputs.users.height, user_chunk_size):
        pairs = inputs.users.slice(start, user_chunk_size).join(inputs.ads, how="cross")
        scored = pairs.with_columns(pl.Series("pctr", predict_pctr(model, pairs)))
        # same order as sql/ad_rankings.sql, so the SQL ranks exactly these rows
        top = (
            scored.sort(["user_id", "pctr", "ad_id"], descending=[False, True, False])
            .group_by("user_id", maintain_order=True)
            .head(top_n)
        )
        kept.append(top.select("user_id", "ad_id", "pctr"))
    if not kept:
        return pa.table(
            {
                "user_id": pa.array([], pa.string()),
                "ad_id": pa.array([], pa.string()),
                "pctr": pa.array([], pa.float64()),
            }
        )
    return pl.concat(kept).to_arrow()
