import duckdb
import pyarrow.parquet as pq

from tasks.config import SampleDataConfig
from tasks.logs import open_logs
from tasks.sample_data import generate_sample_logs

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


def test_clicks_follow_the_hidden_interests(tmp_path):
    """Users click far more on ads of topics they have clicked before: the text carries the signal."""
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
    assert repeat_ctr > 2 * other_ctr


def test_regenerating_replaces_the_old_folder(tmp_path):
    generate_sample_logs(SMALL, tmp_path / "logs")
    stray = tmp_path / "logs" / "impressions" / "date=1999-01-01"
    stray.mkdir()
    generate_sample_logs(SMALL, tmp_path / "logs")
    assert not stray.exists()
    assert duckdb.sql(f"select count(*) from '{tmp_path}/logs/ads/*.parquet'").fetchone()[0] == SMALL.ads
