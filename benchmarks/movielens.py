"""MovieLens-100K -> adrank's log contract (see ../shared/datasets/README.md for the mapping).

Every rating is an impression, a rating >= 4 a click; a movie is an ad (title with year, genres);
a user's profile is age, gender and occupation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl

from tasks.folders import replaced_whole

CLICK_RATING = 4
FILES = ("u.data", "u.item", "u.user", "u.genre")
ITEM_COLUMNS = ["item_id", "title", "release_date", "video_release_date", "imdb_url"]


def checksum(source: Path) -> str:
    """SHA-256 over the files the conversion reads, to name the exact data in results."""
    digest = hashlib.sha256()
    for name in FILES:
        digest.update((source / name).read_bytes())
    return digest.hexdigest()


def convert_movielens(source: Path, out_dir: Path) -> dict[str, int]:
    """Write impressions/, ads/, users/ Parquet folders under out_dir; returns row counts."""
    missing = [name for name in FILES if not (source / name).exists()]
    if missing:
        raise FileNotFoundError(f"{source}: not a MovieLens-100K folder, missing {missing}")
    genres = [line.split("|")[0] for line in (source / "u.genre").read_text(encoding="latin-1").splitlines() if line]
    ratings = pl.read_csv(
        source / "u.data", separator="\t", has_header=False, new_columns=["user_id", "item_id", "rating", "unix_ts"]
    )
    items = pl.read_csv(
        source / "u.item",
        separator="|",
        has_header=False,
        encoding="utf8-lossy",
        new_columns=ITEM_COLUMNS + genres,
        quote_char=None,
    )
    users = pl.read_csv(
        source / "u.user",
        separator="|",
        has_header=False,
        new_columns=["user_id", "age", "gender", "occupation", "zip_code"],
    )

    impressions = (
        ratings.sort("unix_ts", "user_id", "item_id")
        .with_row_index("impression_id")
        .select(
            "impression_id",
            pl.from_epoch("unix_ts", time_unit="s").alias("ts"),
            "user_id",
            pl.col("item_id").alias("ad_id"),
            (pl.col("rating") >= CLICK_RATING).alias("clicked"),
        )
    )
    genre_names = pl.concat_list([pl.when(pl.col(g) == 1).then(pl.lit(g)) for g in genres]).list.drop_nulls()
    ads = items.select(
        pl.col("item_id").alias("ad_id"),
        "title",
        ("Genres: " + genre_names.list.join(", ") + ".").alias("description"),
        genre_names.list.first().alias("category"),
        pl.col("release_date").str.strptime(pl.Datetime, "%d-%b-%Y", strict=False).alias("created_at"),
        # beyond the contract (staging ignores them): what the content-aware peers read
        genre_names.alias("genres"),
        pl.col("title").str.extract(r"\((\d{4})\)\s*$").cast(pl.Int32).alias("year"),
    )
    profiles = users.select("user_id", "age", pl.col("gender").replace({"M": "male", "F": "female"}), "occupation")

    with replaced_whole(out_dir) as tmp:
        for name, frame in (("impressions", impressions), ("ads", ads), ("users", profiles)):
            (tmp / name).mkdir(parents=True)
            frame.write_parquet(tmp / name / "part-0.parquet")
    return {"impressions": impressions.height, "ads": ads.height, "users": profiles.height}
