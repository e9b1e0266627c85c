"""Build ad-user text pairs: point-in-time user histories, rendered texts, a split by time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq

from tasks.affinity import SHOWN_ID_COLUMNS, SHOWN_TEXT_COLUMN, shown_texts
from tasks.config import DataConfig, Settings, template_fields, text_settings
from tasks.logs import log_quality, open_logs, stage_candidates
from tasks.output_layer import AD_PRIOR_COLUMNS, USER_PRIOR_COLUMNS
from tasks.progress import StageProgress
from tasks.sql_files import load_sql, materialize

SPLITS = ("train", "valid", "test")
ADS_FILE = "ads.parquet"  # beside the splits: every ad's text (ad_id, ad_text), for the shown ads' ids
HISTORY_SEPARATOR = " | "
EMPTY_HISTORY = "nothing yet"


@dataclass(frozen=True)
class Pairs:
    """Where build_pairs wrote each split, and what it holds."""

    paths: dict[str, Path]
    rows: dict[str, int]
    clicks: dict[str, int]
    train_from: datetime  # the first training impression (after data.max_train_pairs)
    valid_from: datetime
    test_from: datetime
    data_until: datetime  # the last impression of the logs: what the model knows ends here
    log_quality: dict[str, int]  # how often a documented rule was applied to the logs (tasks/logs.py)


@dataclass(frozen=True)
class RankingInputs:
    """The texts to score for one run_date: active users and active ads."""

    run_date: date
    # user_id, user_text, user_prior_impressions, user_prior_clicks, history_ad_ids (and shown_ad_ids, shown_clicked)
    users: pl.DataFrame
    ads: pl.DataFrame  # ad_id, bid (null where none and the objective is pctr), ad_prior_*, ad_text
    candidates: pl.DataFrame | None = None  # user_id, ad_id allowed (ranking.candidates_table); None: all ads
    # ad_id, ad_text of every ad in the users' shown_ad_ids (data.shown_history_length > 0; None: none carried)
    shown_ads: pl.DataFrame | None = None


def build_pairs(settings: Settings, pairs_dir: Path | None = None) -> Pairs:
    """Read the logs and write <pairs_dir>/{train,valid,test}.parquet (default <home>/pairs) and ADS_FILE.

    DuckDB joins the histories within data.duckdb_memory_limit (spilling to <home>/tmp); the pairs then
    stream out in time order, data.pair_batch_rows at a time, so memory does not grow with the logs."""
    data = settings.data
    with StageProgress("build_pairs", 4 + len(SPLITS), "steps") as bar:  # read + 3 SQL steps + texts, then splits
        con = open_logs(data.logs, data, spill_dir=settings.home / "tmp")
        bar.advance(1, step="logs read and checked")
        as_of = {"features_as_of": data.features_as_of}
        materialize(con, "int_impression_history_requests", as_of, table="history_requests")
        materialize(con, "int_user_histories", history_lengths(data))
        bar.advance(1, step="user histories")
        _materialize_ad_counts(con, "int_impression_ad_requests")
        materialize(con, "int_ranked_user_days", {"window_days": settings.ranking.active_window_days})
        materialize(con, "int_split_cutoffs", split_fractions(data))
        materialize(con, "int_ad_first_shown")
        counts = _split_counts(con)
        if not any(counts.values()):
            raise ValueError(f"{data.logs}: no impressions to build pairs from")
        bar.advance(1, step=f"{sum(counts.values())} pairs")
        skip = 0  # the earliest training pairs left out: rows are in time order, data.max_train_pairs keeps the latest
        if data.max_train_pairs is not None:
            skip = max(counts["train"] - data.max_train_pairs, 0)
        for split in SPLITS:
            if not counts[split]:
                raise ValueError(f"{data.logs}: the {split} split is empty; more days of logs are needed")
        add_texts = _pair_texts(con, data)
        bar.advance(1, step="texts")

        pairs_dir = pairs_dir or settings.pairs_dir
        pairs_dir.mkdir(parents=True, exist_ok=True)

        stream = con.execute(load_sql("int_user_ad_pairs")).fetch_record_batch(data.pair_batch_rows)
        with _SplitWriter(pairs_dir) as writer:
            for batch in stream:
                part = pl.from_arrow(batch)
                if skip:
                    skipped = min(skip, part.height)
                    part, skip = part.slice(skipped), skip - skipped
                if part.height:
                    writer.write(add_texts(part))
            for split in SPLITS:
                bar.advance(1, step=f"{split} {writer.rows[split]} pairs")
        _write_whole(render_ad_texts(con, data.ad_template), pairs_dir / ADS_FILE)
    quality = log_quality(con, data)
    print(f"{data.logs}: " + ", ".join(f"{name} {n}" for name, n in quality.items()))
    first_of = writer.first_shown_at
    return Pairs(
        writer.paths,
        writer.rows,
        writer.clicks,
        first_of["train"],
        first_of["valid"],
        first_of["test"],
        writer.last_shown_at,
        quality,
    )


def _write_whole(frame: pl.DataFrame, path: Path) -> None:
    """Write frame to path through a temporary file renamed into place: a reader sees the old file or the new."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        frame.write_parquet(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def history_lengths(data: DataConfig) -> dict[str, int]:
    """The parameters of sql/int_user_histories.sql."""
    return {"history_length": data.history_length, "shown_history_length": data.shown_history_length}


def read_ad_texts(pairs_dir: Path) -> pl.DataFrame:
    """ad_id, ad_text of every ad, as build_pairs wrote them beside the splits."""
    path = Path(pairs_dir) / ADS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ad texts beside the pairs; build the pairs again (adrank's build_pairs)")
    return pl.read_parquet(path)


def _split_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Pairs per split, before data.max_train_pairs: the pairs query without its texts (or its sort)."""
    counted = dict(
        con.execute(f"select split, count(*) from ({load_sql('int_user_ad_pairs')}) group by split").fetchall()
    )
    return {split: counted.get(split, 0) for split in SPLITS}


class _SplitWriter:
    """Appends pairs (in time order: train, then valid, then test) to each split's Parquet file; the files
    replace <pairs_dir>/<split>.parquet only once all are complete."""

    def __init__(self, pairs_dir: Path) -> None:
        self.paths = {split: pairs_dir / f"{split}.parquet" for split in SPLITS}
        self.rows = dict.fromkeys(SPLITS, 0)
        self.clicks = dict.fromkeys(SPLITS, 0)
        self.first_shown_at: dict[str, datetime] = {}
        self.last_shown_at: datetime | None = None
        self._writers: dict[str, pq.ParquetWriter] = {}

    def write(self, pairs: pl.DataFrame) -> None:
        for split in SPLITS:
            part = pairs.filter(pl.col("split") == split)
            if part.is_empty():
                continue
            table = part.to_arrow()
            if split not in self._writers:
                tmp = self.paths[split].with_suffix(".parquet.tmp")
                self._writers[split] = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                self.first_shown_at[split] = part["shown_at"][0]
            self._writers[split].write_table(table)
            self.rows[split] += part.height
            self.clicks[split] += int(part["is_clicked"].sum())
            self.last_shown_at = part["shown_at"][-1]

    def __enter__(self) -> _SplitWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        for writer in self._writers.values():
            writer.close()
        tmps = {split: path.with_suffix(".parquet.tmp") for split, path in self.paths.items()}
        if error_type is None:
            for split in SPLITS:
                tmps[split].replace(self.paths[split])
        else:
            for tmp in tmps.values():
                tmp.unlink(missing_ok=True)


def _materialize_ad_counts(con: duckdb.DuckDBPyConnection, requests: str, params: dict | None = None) -> None:
    """int_ad_prior_counts: each ad's impressions and clicks before the moments of sql/<requests>.sql."""
    materialize(con, requests, params, table="ad_requests")
    materialize(con, "int_ad_prior_counts")


def test_pairs_as(settings: Settings, built: Pairs, texts: Settings) -> Path:
    """The test pairs of `built` with their texts rendered by `texts`' text settings (tasks/config.py
    TEXT_SETTINGS: a champion trained with other ones is scored on its own kind of input): `built`'s own
    file when the settings agree, else the same impressions in the same order, rebuilt under
    <pairs_dir>/as-trained/."""
    if text_settings(texts) == text_settings(settings):
        return built.paths["test"]
    rebuilt = build_pairs(texts, settings.pairs_dir / "as-trained").paths["test"]
    ours, theirs = (
        pl.read_parquet(path, columns=["impression_id"])["impression_id"] for path in (built.paths["test"], rebuilt)
    )
    if not ours.equals(theirs):
        raise ValueError(f"{rebuilt}: the test pairs rebuilt with other text settings are not the same impressions")
    return rebuilt


def split_fractions(data: DataConfig) -> dict[str, float]:
    """The parameters of sql/int_split_cutoffs.sql."""
    return {"test_fraction": data.test_fraction, "valid_fraction": data.valid_fraction}


def build_ranking_inputs(settings: Settings) -> RankingInputs:
    """User texts (history as of run_date) of recently active users, and texts of active ads."""
    con, ranking = open_logs(settings.data.logs, settings.data), settings.ranking
    run_date, requests = _ranking_requests(con, settings)
    _materialize_ad_counts(con, "int_ranking_ad_requests", {"run_date": run_date})
    users = _render_user_texts(con, settings.data, requests)
    shown = list(SHOWN_ID_COLUMNS) if settings.data.shown_history_length else []
    users = users.select("user_id", "user_text", *USER_PRIOR_COLUMNS, "history_ad_ids", *shown)
    active_ads = con.execute(
        load_sql("int_active_ads"),
        {"run_date": run_date, "objective": ranking.objective, "default_bid": ranking.default_bid},
    ).pl()
    every_ad = render_ad_texts(con, settings.data.ad_template)
    ads = active_ads.join(every_ad, on="ad_id")
    shown_ads = None
    if shown:
        shown_ids = users["shown_ad_ids"].explode().drop_nulls().unique().implode()
        shown_ads = every_ad.filter(pl.col("ad_id").is_in(shown_ids)).sort("ad_id")
    candidates = None
    if ranking.candidates_table is not None:
        stage_candidates(con, settings.data.logs, ranking.candidates_table)
        candidates = con.table("stg_candidates").pl().sort("user_id", "ad_id")
    return RankingInputs(run_date, users.sort("user_id"), ads.sort("ad_id"), candidates, shown_ads)


def _ranking_requests(con: duckdb.DuckDBPyConnection, settings: Settings) -> tuple[date, pl.DataFrame]:
    """The run_date (ranking.run_date or the day after the last impression) and one request per recently
    active user: user_id, history_ad_ids and the user prior counts, as of the start of run_date."""
    ranking = settings.ranking
    run_date = ranking.run_date or con.execute(load_sql("next_run_date")).fetchone()[0]
    materialize(con, "int_active_users", {"run_date": run_date, "window_days": ranking.active_window_days})
    materialize(con, "int_ranking_history_requests", {"run_date": run_date}, table="history_requests")
    materialize(con, "int_user_histories", history_lengths(settings.data))
    return run_date, con.table("int_user_histories").select("request_id as user_id, *").pl()


def history_ablations(settings: Settings, user_id: str, ad_id: str) -> tuple[date, pl.DataFrame]:
    """The (user, ad) pair as rerank scores it on run_date, then once per ad in the user's history with
    that ad's titles left out: left_out_ad_id (null: the full history), left_out_text, user_text, ad_id, ad_text,
    the user's and the ad's prior counts and, with data.shown_history_length, the user's past impressions
    (shown_ad_texts, shown_clicked; all unchanged: leaving a title out of the text does not change what the user
    did)."""
    con = open_logs(settings.data.logs, settings.data)
    run_date, requests = _ranking_requests(con, settings)
    request = requests.filter(pl.col("user_id") == user_id)
    if request.is_empty():
        raise LookupError(
            f"user {user_id!r} has no impressions in the {settings.ranking.active_window_days} days before "
            f"{run_date}: rerank does not rank them that day"
        )
    _materialize_ad_counts(con, "int_ranking_ad_requests", {"run_date": run_date})
    counts = con.table("int_ad_prior_counts").select(f"ad_id, {', '.join(AD_PRIOR_COLUMNS)}").pl()
    ads = render_ad_texts(con, settings.data.ad_template).filter(pl.col("ad_id") == ad_id).join(counts, on="ad_id")
    if ads.is_empty():
        raise LookupError(f"ad {ad_id!r} is not in the ads table of {settings.data.logs}")
    history = request["history_ad_ids"][0].to_list()
    left_out = [None, *dict.fromkeys(history)]  # each ad once: leaving it out drops all its clicks from the text
    variants = pl.concat(
        [request.with_columns(pl.Series("history_ad_ids", [[a for a in history if a != out]])) for out in left_out]
    ).with_columns(pl.Series("left_out_ad_id", left_out, dtype=pl.String))
    titles = dict(render_ad_texts(con, settings.data.history_item_template, "history_item_template").iter_rows())
    texts = _render_user_texts(con, settings.data, variants).with_columns(
        pl.col("left_out_ad_id").replace_strict(titles, default=None).alias("left_out_text")
    )
    texts = _with_shown_texts(con, settings.data, texts) if settings.data.shown_history_length else texts
    shown = [SHOWN_TEXT_COLUMN, "shown_clicked"] if settings.data.shown_history_length else []
    return run_date, texts.select("left_out_ad_id", "left_out_text", "user_text", *USER_PRIOR_COLUMNS, *shown).join(
        ads, how="cross"
    )


def build_window_pairs(
    con: duckdb.DuckDBPyConnection,
    data: DataConfig,
    window_from: datetime,
    window_until: datetime,
    active_window_days: int,
    max_rows: int | None = None,
) -> pl.DataFrame:
    """The impressions shown in [window_from, window_until) (at most max_rows, a fixed pseudo-random
    sample) as pairs with the features rerank had for their day: history and the user's and ad's counts as
    of the start of the day, whether rerank ranked the user that day (the users of
    ranking.active_window_days), user and ad texts, and the ad's category and age in days. con: open_logs'
    connection."""
    window = {"window_from": window_from, "window_until": window_until, "max_rows": max_rows}
    materialize(con, "int_window_history_requests", window, table="history_requests")
    materialize(con, "int_user_histories", history_lengths(data))
    _materialize_ad_counts(con, "int_impression_ad_requests")
    materialize(con, "int_ranked_user_days", {"window_days": active_window_days})
    materialize(con, "int_ad_first_shown")
    pairs = con.execute(load_sql("int_window_impressions")).pl()
    made = ("history_requests", "int_user_histories", "ad_requests", "int_ad_prior_counts", "int_ranked_user_days")
    for table in (*made, "int_ad_first_shown"):  # the next window makes its own
        con.execute(f"drop table {table}")
    if pairs.is_empty():
        return pairs
    pairs = pairs.join(_user_texts_by_request(con, data, pairs), on="impression_id")
    pairs = _with_shown_texts(con, data, pairs) if data.shown_history_length else pairs.drop(SHOWN_ID_COLUMNS)
    return pairs.join(render_ad_texts(con, data.ad_template), on="ad_id").sort("shown_at", "impression_id")


def _with_shown_texts(con: duckdb.DuckDBPyConnection, data: DataConfig, requests: pl.DataFrame) -> pl.DataFrame:
    """requests with SHOWN_TEXT_COLUMN: their shown_ad_ids' texts (what the served model reads, tasks/affinity.py)."""
    return requests.with_columns(shown_texts(requests, render_ad_texts(con, data.ad_template)))


def _user_texts_by_request(con: duckdb.DuckDBPyConnection, data: DataConfig, pairs: pl.DataFrame) -> pl.DataFrame:
    requests = pairs.select(pl.col("impression_id").alias("request_id"), "user_id", "history_ad_ids")
    texts = _render_user_texts(con, data, requests)
    return texts.select(pl.col("request_id").alias("impression_id"), "user_text")


def _pair_texts(con: duckdb.DuckDBPyConnection, data: DataConfig) -> Callable[[pl.DataFrame], pl.DataFrame]:
    """A function adding user_text and ad_text to a batch of pairs (in order); profiles and ad texts are
    rendered once, here, not per batch."""
    user_texts = _user_text_renderer(con, data)
    ad_texts = render_ad_texts(con, data.ad_template)

    def add_texts(pairs: pl.DataFrame) -> pl.DataFrame:
        with_user = pairs.with_columns(user_texts(pairs))
        return with_user.join(ad_texts, on="ad_id", how="inner", maintain_order="left")

    return add_texts


def _render_user_texts(con: duckdb.DuckDBPyConnection, data: DataConfig, requests: pl.DataFrame) -> pl.DataFrame:
    """requests (user_id, history_ad_ids, ...) -> the same rows with user_text; each history ad is rendered
    with data.history_item_template, most recent first."""
    return requests.with_columns(_user_text_renderer(con, data)(requests))


def _user_text_renderer(con: duckdb.DuckDBPyConnection, data: DataConfig) -> Callable[[pl.DataFrame], pl.Series]:
    """A function from requests (user_id, history_ad_ids) to their user_text, in order; the users' profiles
    and the history items are rendered once, here."""
    history_items = dict(render_ad_texts(con, data.history_item_template, "history_item_template").iter_rows())
    users = con.table("stg_users").pl()
    profile_columns = [c for c in users.columns if c != "user_id"]
    _check_template("user_template", data.user_template, {"profile", "history", *profile_columns})
    profiles = users.with_columns(
        pl.struct(profile_columns)
        .map_elements(lambda row: render_profile(row, data.max_text_chars), return_dtype=pl.String)
        .alias("profile")
        if profile_columns
        else pl.lit("").alias("profile")
    )
    fields = template_fields(data.user_template) - {"history"}  # only what the template reads goes row by row
    profiles = profiles.select("user_id", *sorted(fields))

    def user_texts(requests: pl.DataFrame) -> pl.Series:
        rows = requests.select("user_id", "history_ad_ids").join(
            profiles, on="user_id", how="left", maintain_order="left"
        )
        texts = [
            _fill(data.user_template, {**row, "history": _history(row["history_ad_ids"], history_items)})
            for row in rows.select(*sorted(fields), "history_ad_ids").iter_rows(named=True)
        ]
        return pl.Series("user_text", texts, dtype=pl.String)

    return user_texts


def render_profile(attributes: dict, max_chars: int) -> str:
    """'age: 34, city: Leeds' from a user's profile columns, skipping empty ones, each value cut to max_chars."""
    return ", ".join(
        f"{name}: {str(value)[:max_chars]}" for name, value in attributes.items() if value not in (None, "")
    )


def _history(ad_ids: list[str], items: dict[str, str]) -> str:
    return HISTORY_SEPARATOR.join(items[a] for a in ad_ids) or EMPTY_HISTORY


def render_ad_texts(con: duckdb.DuckDBPyConnection, template: str, name: str = "ad_template") -> pl.DataFrame:
    """ad_id, ad_text for every ad in stg_ads (name: the config field the template comes from, for errors)."""
    ads = con.table("stg_ads").pl()
    _check_template(name, template, set(ads.columns))
    texts = [_fill(template, row) for row in ads.iter_rows(named=True)]
    return ads.select("ad_id").with_columns(pl.Series("ad_text", texts, dtype=pl.String))


def _check_template(name: str, template: str, available: set[str]) -> None:
    unknown = template_fields(template) - available
    if unknown:
        raise ValueError(
            f"data.{name} uses {sorted(unknown)}, which the logs do not have; available: {sorted(available)}"
        )


def _fill(template: str, values: dict) -> str:
    """The template with None as empty and whitespace collapsed (empty optional columns leave no gaps)."""
    text = template.format_map({k: "" if v is None else v for k, v in values.items()})
    return " ".join(text.split())
