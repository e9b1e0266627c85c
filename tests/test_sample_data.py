import re
from datetime import timedelta

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq

from tasks.config import SampleDataConfig
from tasks.logs import open_logs
from tasks.metrics import roc_auc
from tasks.sample_data import (
    PRODUCTS,
    SEARCHES,
    SEARCHES_PER_USER,
    TOPICS,
    click_logit,
    generate_sample_logs,
    sample_market,
)

SMALL = SampleDataConfig(users=30, advertisers=4, ads=10, days=6, cold_start_days=2)


def _tables(root):
    return {
        name: pq.read_table(root / name).drop_columns(["date"] if name == "impressions" else []).to_pylist()
        for name in ("impressions", "ads", "users")
    }


def test_same_seed_same_market(tmp_path):
    generate_sample_logs(SMALL, tmp_path / "a")
    generate_sample_logs(SMALL, tmp_path / "b")
    generate_sample_logs(SMALL.model_copy(update={"seed": 8}), tmp_path / "c")
    assert _tables(tmp_path / "a") == _tables(tmp_path / "b")
    assert _tables(tmp_path / "a")["impressions"] != _tables(tmp_path / "c")["impressions"]


def test_market_follows_the_contract_and_has_cold_start_ads(tmp_path):
    counts = generate_sample_logs(SMALL, tmp_path / "logs")
    assert not (tmp_path / "logs.tmp").exists()
    con = open_logs(str(tmp_path / "logs"))  # raises on any contract violation
    assert con.execute("select count(*) from stg_impressions").fetchone()[0] == counts["impressions"]
    assert len(list((tmp_path / "logs" / "impressions").glob("date=*"))) == SMALL.days
    ctr = con.execute("select avg(is_clicked::int) from stg_impressions").fetchone()[0]
    assert 0.03 < ctr < 0.3
    late_ads = con.execute(
        "select count(*) from stg_ads where created_at >= (select min(shown_at) from stg_impressions) + interval 4 day"
    ).fetchone()[0]
    assert late_ads >= 1


def test_hidden_click_terms_stay_out_of_the_logs_and_explain_the_clicks(tmp_path):
    """The click model's terms (benchmarks/sample_ceiling.py's ceiling) are each impression's, never written."""
    config = SampleDataConfig(users=150, days=10)
    market = sample_market(config)
    generate_sample_logs(config, tmp_path / "logs")
    written = pq.read_table(tmp_path / "logs" / "impressions")
    assert not {"interest", "ad_quality"} & set(written.column_names)
    assert market.impressions.num_rows == written.num_rows
    terms = market.click_terms.to_pydict()
    assert terms["impression_id"] == market.impressions["impression_id"].to_pylist()
    assert terms["position"] == market.impressions["position"].to_pylist()
    logit = click_logit(*(np.array(terms[c]) for c in ("interest", "ad_quality", "position")))
    clicked = np.array(market.impressions["clicked"].to_pylist())
    assert roc_auc(clicked, logit) > 0.75  # the labels' own model: only the noise and the draw stand between


def test_clicks_follow_the_hidden_interests(tmp_path):
    """Users click more on ads of topics they have clicked before (1.5x; within a topic the product matters
    more, below): the history carries the signal."""
    generate_sample_logs(SampleDataConfig(users=150, days=10), tmp_path / "logs")
    con = open_logs(str(tmp_path / "logs"))
    repeat_ctr, other_ctr = con.execute(
        """
        with shown as (
            select i.user_id, i.shown_at, i.is_clicked, a.category from stg_impressions i join stg_ads a using (ad_id)
        ),
        flagged as (
            select s.*, exists(select 1 from shown p where p.user_id = s.user_id and p.category = s.category
                               and p.is_clicked and p.shown_at < s.shown_at) as clicked_topic_before
            from shown s
        )
        select avg(is_clicked::int) filter (where clicked_topic_before),
               avg(is_clicked::int) filter (where not clicked_topic_before)
        from flagged
        """
    ).fetchone()
    assert repeat_ctr > 1.5 * other_ctr


def test_users_click_the_products_they_like_not_just_their_topics(tmp_path):
    """Within a topic, an ad for a product the user clicked before is clicked far more often than an ad for
    the topic's other products: `category` alone cannot tell what the ad's copy can."""
    generate_sample_logs(SampleDataConfig(users=300, days=10), tmp_path / "logs")
    ads = pl.read_parquet(tmp_path / "logs" / "ads").with_columns(
        product=pl.col("title").map_elements(lambda title: next(p for _, p in PRODUCTS if p in title), pl.String)
    )
    shown = (
        pl.read_parquet(tmp_path / "logs" / "impressions")
        .join(ads.select("ad_id", "category", "product"), on="ad_id")
        .sort("ts")
    )
    clicked = shown.filter("clicked").group_by("user_id", "category", "product").agg(pl.col("ts").min().alias("first"))
    flagged = shown.join(clicked, on=["user_id", "category"], how="inner", suffix="_clicked").filter(
        pl.col("first") < pl.col("ts")
    )
    per_impression = flagged.group_by("impression_id").agg(
        (pl.col("product") == pl.col("product_clicked")).any().alias("liked_product"), pl.col("clicked").first()
    )
    ctr = dict(per_impression.group_by("liked_product").agg(pl.col("clicked").mean()).iter_rows())
    assert ctr[True] > 2 * ctr[False], ctr


def test_regenerating_replaces_the_old_folder(tmp_path):
    generate_sample_logs(SMALL, tmp_path / "logs")
    stray = tmp_path / "logs" / "impressions" / "date=1999-01-01"
    stray.mkdir()
    generate_sample_logs(SMALL, tmp_path / "logs")
    assert not stray.exists()
    assert duckdb.sql(f"select count(*) from '{tmp_path}/logs/ads/*.parquet'").fetchone()[0] == SMALL.ads


def test_users_search_in_their_own_words_about_their_interests(tmp_path):
    """Searches never name a topic or an ad's product or brand: the text must carry meaning, not ad copy."""
    ad_words = set(TOPICS) | {
        word
        for advertisers, products, _ in TOPICS.values()
        for phrase in (*advertisers, *products)
        for word in re.findall(r"[a-z0-9]+", phrase.lower())
        if len(word) > 2 and word not in ("with", "from", "for", "the", "and")
    }
    for searches in SEARCHES.values():
        for search in searches:
            assert not set(re.findall(r"[a-z0-9]+", search)) & ad_words, search
    generate_sample_logs(SMALL, tmp_path / "logs")
    users = pq.read_table(tmp_path / "logs" / "users").to_pylist()
    known = {search for searches in SEARCHES.values() for search in searches}
    for user in users:
        searches = user["recent_searches"].split("; ")
        assert len(set(searches)) == SEARCHES_PER_USER and set(searches) <= known


def test_a_request_shows_distinct_ads_at_positions_one_to_k_and_the_server_explores_new_ads(tmp_path):
    def impressions(name: str, **config) -> pl.DataFrame:
        generate_sample_logs(SMALL.model_copy(update=config), tmp_path / name)
        ads = pl.read_parquet(tmp_path / name / "ads").select("ad_id", "created_at")
        return pl.read_parquet(tmp_path / name / "impressions").join(ads, on="ad_id")

    shown = impressions("default")
    requests = shown.group_by("user_id", "ts").agg(
        pl.len().alias("ads"), pl.col("ad_id").n_unique().alias("distinct"), pl.col("position").sort()
    )
    assert (requests["ads"] == requests["distinct"]).all() and requests["ads"].max() == SMALL.ads_per_request
    assert all(positions.to_list() == list(range(1, len(positions) + 1)) for positions in requests["position"])

    def new_ads_share(frame: pl.DataFrame) -> float:
        launched = frame["created_at"] > frame["ts"] - timedelta(days=SMALL.exploration_days)
        return float(launched.mean())

    explored, never = impressions("explored", exploration_share=1.0), impressions("never", exploration_share=0.0)
    assert new_ads_share(explored) > 1.5 * new_ads_share(never)  # few new ads, and each shown once a request
