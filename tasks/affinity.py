"""The affinity term's inputs: how often a user clicked the ads they were shown before that are like the ad
scored.

The user text holds a user's clicks, and the user prior counts their clicks on every ad alike; neither says how
this user responded when shown ads like this one. Over the user's latest data.shown_history_length impressions
before the request (sql/int_user_histories.sql: shown_ad_ids and shown_clicked, as of the moment the pair's other
features are), each impression is weighted by how close its ad is to the scored ad in the semantic match's
embedding space, exp((cosine - 1) / bandwidth): 1 for the same ad, exp(-5) at cosine 0.5 and exp(-10) at
cosine 0 with the default 0.1. similar_impressions is the sum of the weights, similar_clicks the sum over the
clicked ones. The output layer turns them into its affinity terms (tasks/output_layer.py
Calibration.affinity_terms). A cold ad gets them too, from the user's impressions of other ads like it (its own
were never shown).
benchmarks/affinity_lever.py measured the lever on validation before it was built in.

Pairs name the shown ads by id with a table of ad texts (training, evaluation) or by text (the served model's
shown_ad_texts column, explain, the monitor): with_similar; rerank counts every user x ad of a chunk at once:
similar_grid. The served model imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import polars as pl

from tasks.output_layer import SIMILAR_COLUMNS

SHOWN_ID_COLUMNS = ("shown_ad_ids", "shown_clicked")  # in pairs and rerank's users: the latest impressions first
SHOWN_TEXT_COLUMN = "shown_ad_texts"  # the served model's input: the shown ads' texts, beside shown_clicked
ITEM_BLOCK = 16384  # past impressions compared with their pairs' ads at once (bounds the gathered embeddings)
AD_BLOCK = 2048  # ads whose kernel against every distinct shown ad of a user chunk is held at once (rerank)


def kernel(cosine: np.ndarray, bandwidth: float) -> np.ndarray:
    """How much a past impression counts for an ad at this cosine from its ad: 1 at the same text."""
    return np.exp((cosine - 1.0) / bandwidth)


def similar_counts(
    encoder,
    ad_texts: Sequence[str],
    shown_texts: Sequence[str],
    lengths: np.ndarray,
    shown_clicked: np.ndarray,
    bandwidth: float,
) -> np.ndarray:
    """Per pair, similar impressions and similar clicks, shape (pairs, 2). ad_texts: each pair's ad; shown_texts
    and shown_clicked: every pair's past impressions in one run, pair after pair (lengths: how many each has).
    encoder: the semantic match's (tasks/semantic_match.py MatchEncoder); each distinct text is embedded once."""
    n = len(ad_texts)
    codes, unique = pd.factorize(
        np.concatenate([np.asarray(ad_texts, dtype=object), np.asarray(shown_texts, dtype=object)])
    )
    vectors = encoder.embed([str(t) for t in unique]) if len(unique) else np.zeros((0, 1))
    ad_rows, shown_rows = codes[:n], codes[n:]
    owner = np.repeat(np.arange(n), lengths)  # each past impression's pair
    clicked = np.asarray(shown_clicked, dtype=np.float64)
    out = np.zeros((n, 2))
    for start in range(0, len(shown_rows), ITEM_BLOCK):
        block = slice(start, start + ITEM_BLOCK)
        cosine = np.einsum("ij,ij->i", vectors[shown_rows[block]], vectors[ad_rows[owner[block]]])
        weights = kernel(cosine.astype(np.float64), bandwidth)
        out[:, 0] += np.bincount(owner[block], weights, minlength=n)
        out[:, 1] += np.bincount(owner[block], weights * clicked[block], minlength=n)
    return out


def similar_grid(
    lengths: np.ndarray,
    shown_rows: np.ndarray,
    shown_clicked: np.ndarray,
    shown_vectors: np.ndarray,
    ad_vectors: np.ndarray,
    bandwidth: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Similar impressions and similar clicks of every user x ad, each (users, ads): the users' past impressions
    in one run (lengths per user), as rows of shown_vectors, against every row of ad_vectors (unit embeddings).
    Two matrix products over the distinct ads the users were shown."""
    distinct, column = np.unique(shown_rows, return_inverse=True)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    counts = np.zeros((2, len(lengths), len(distinct)))  # per user and distinct shown ad: impressions, clicks
    np.add.at(counts[0], (owner, column), 1.0)
    np.add.at(counts[1], (owner, column), np.asarray(shown_clicked, dtype=np.float64))
    out = np.zeros((2, len(lengths), len(ad_vectors)))
    past = shown_vectors[distinct].astype(np.float64)
    for start in range(0, len(ad_vectors), AD_BLOCK):  # the kernel a block of ads at a time: bounded memory
        block = slice(start, start + AD_BLOCK)
        weights = kernel(past @ ad_vectors[block].astype(np.float64).T, bandwidth)  # (distinct shown, block)
        out[:, :, block] = counts @ weights
    return out[0], out[1]


def with_similar(pairs: pl.DataFrame, encoder, bandwidth: float, ads: pl.DataFrame | None = None) -> pl.DataFrame:
    """The pairs with SIMILAR_COLUMNS from their ad_text and shown ads: shown_ad_ids (texts from ads: ad_id,
    ad_text) or SHOWN_TEXT_COLUMN, and shown_clicked. A shown ad missing from ads is an error naming it."""
    texts = shown_texts(pairs, ads)
    lengths = pairs["shown_clicked"].list.len().fill_null(0).to_numpy()
    differ = np.flatnonzero(texts.list.len().fill_null(0).to_numpy() != lengths)
    if differ.size:
        raise ValueError(f"shown_clicked must hold one flag per shown ad: not so in rows {differ[:10].tolist()}")
    clicked, flat = (column.filter(lengths > 0).explode() for column in (pairs["shown_clicked"], texts))
    for name, values in (("shown_clicked", clicked), ("the shown ads", flat)):
        if values.null_count():
            rows = np.repeat(np.arange(pairs.height), lengths)[values.is_null().to_numpy()]
            raise ValueError(f"{name} hold nulls in rows {np.unique(rows)[:10].tolist()}")
    counts = similar_counts(
        encoder, pairs["ad_text"].to_list(), flat.to_list(), lengths, clicked.cast(pl.Float64).to_numpy(), bandwidth
    )
    return pairs.with_columns(pl.Series(name, counts[:, i], dtype=pl.Float64) for i, name in enumerate(SIMILAR_COLUMNS))


def shown_texts(pairs: pl.DataFrame, ads: pl.DataFrame | None) -> pl.Series:
    """Each pair's shown ads as texts: SHOWN_TEXT_COLUMN as it is, or shown_ad_ids looked up in ads."""
    if SHOWN_TEXT_COLUMN in pairs.columns:
        return pairs[SHOWN_TEXT_COLUMN]
    missing = [c for c in SHOWN_ID_COLUMNS if c not in pairs.columns]
    if missing or ads is None:
        raise ValueError(
            f"the affinity term needs each pair's past impressions: {SHOWN_TEXT_COLUMN} or shown_ad_ids "
            f"(with a table of ad texts), and shown_clicked; missing {missing or ['the ad texts']}"
        )
    rows = pairs.select(pl.int_range(pl.len()).alias("pair"), "shown_ad_ids").explode("shown_ad_ids").drop_nulls()
    looked_up = rows.join(
        ads.select("ad_id", "ad_text"), left_on="shown_ad_ids", right_on="ad_id", how="left", maintain_order="left"
    )
    unknown = looked_up.filter(pl.col("ad_text").is_null())
    if unknown.height:
        raise ValueError(
            f"shown_ad_ids name ads with no text: {unknown['shown_ad_ids'].unique().head(10).to_list()} "
            f"(pair rows {unknown['pair'].unique().head(10).to_list()})"
        )
    lists = looked_up.group_by("pair", maintain_order=True).agg("ad_text")
    empty = pl.DataFrame({"pair": np.arange(pairs.height)}).join(lists, on="pair", how="left", maintain_order="left")
    return empty["ad_text"].fill_null(pl.lit([], dtype=pl.List(pl.String))).alias(SHOWN_TEXT_COLUMN)
