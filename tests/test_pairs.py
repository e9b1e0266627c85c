from datetime import date, datetime, timedelta

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.logs import LogContractError
from tasks.pairs import EMPTY_HISTORY, build_pairs, build_ranking_inputs, read_ad_texts, render_profile
from tests.conftest import write_logs

START = datetime(2026, 3, 1, 9, 0)
ADS = [
    {"ad_id": "a1", "title": "Alpha", "description": "First ad.", "category": "x"},
    {"ad_id": "a2", "title": "Beta", "description": None, "category": "y"},
    {"ad_id": "a3", "title": "Gamma", "description": "Third ad.", "category": "x"},
    {"ad_id": "a4", "title": "Delta", "description": "Fourth ad.", "category": "y", "active": False},
    {
        "ad_id": "a5",
        "title": "Epsilon",
        "description": "New ad.",
        "category": "x",
        "created_at": START + timedelta(days=30),
    },
]
USERS = [{"user_id": "u1", "age": 30, "city": "Leeds"}, {"user_id": "u2", "age": None, "city": "York"}]


def imp(i: int, minutes: float, user: str, ad: str, clicked: bool) -> dict:
    return {
        "impression_id": i,
        "ts": START + timedelta(minutes=minutes),
        "user_id": user,
        "ad_id": ad,
        "clicked": clicked,
    }


IMPRESSIONS = [
    imp(1, 0, "u1", "a1", True),
    imp(2, 60, "u1", "a2", True),
    imp(3, 60, "u1", "a3", False),  # same instant as the click on a2: that click is not "before" it
    imp(4, 24 * 60, "u1", "a3", True),
    imp(5, 48 * 60, "u1", "a4", False),
    imp(6, 48 * 60 + 1, "u2", "a1", False),
    imp(7, 49 * 60, "u1", "a1", True),
    imp(8, 72 * 60, "u2", "a2", False),
    imp(9, 96 * 60, "u1", "a2", False),
    imp(10, 120 * 60, "u2", "a3", True),
]


def build_rows(settings) -> tuple:
    built = build_pairs(settings)
    frame = pl.concat([pl.read_parquet(built.paths[s]) for s in ("train", "valid", "test")])
    return built, {row["impression_id"]: row for row in frame.iter_rows(named=True)}


@pytest.fixture
def pairs(tmp_path, make_settings):
    """Pairs with features as of each impression (data.features_as_of = impression: online scoring)."""
    write_logs(tmp_path / "logs", IMPRESSIONS, ADS, USERS)
    data = {"history_length": 2, "valid_fraction": 0.2, "test_fraction": 0.2, "features_as_of": "impression"}
    return build_rows(make_settings(data={"logs": str(tmp_path / "logs"), **data}))


@pytest.fixture
def day_start_pairs(tmp_path, make_settings):
    """Pairs with features as of the start of each impression's day: the default, what rerank knows."""
    write_logs(tmp_path / "logs", IMPRESSIONS, ADS, USERS)
    data = {"history_length": 2, "valid_fraction": 0.2, "test_fraction": 0.2}
    return build_rows(make_settings(data={"logs": str(tmp_path / "logs"), **data}))


def test_by_default_features_are_taken_at_the_start_of_the_impressions_day(day_start_pairs):
    _, rows = day_start_pairs
    history = {i: r["user_text"].split("Recently clicked: ")[1] for i, r in rows.items()}
    counts = {i: (r["user_prior_impressions"], r["user_prior_clicks"]) for i, r in rows.items()}
    # hand-computed: day 1 (impressions 1-3) knows nothing; impression 7 knows u1's day 2 but not day 3's 5
    assert [history[i] for i in ("1", "2", "3")] == [EMPTY_HISTORY] * 3
    assert [counts[i] for i in ("1", "2", "3")] == [(0, 0)] * 3
    assert history["4"] == "Beta | Alpha" and counts["4"] == (3, 2)
    assert history["5"] == history["7"] == "Gamma | Beta" and counts["5"] == counts["7"] == (4, 3)
    assert history["9"] == "Alpha | Gamma" and counts["9"] == (6, 4)
    assert counts["6"] == (0, 0) and counts["8"] == (1, 0) and counts["10"] == (2, 0)
    for row in rows.values():  # and by brute force: everything before the impression's day, nothing of it
        day_start = datetime.combine(row["shown_at"].date(), datetime.min.time())
        before = [r for r in rows.values() if r["user_id"] == row["user_id"] and r["shown_at"] < day_start]
        assert counts[row["impression_id"]] == (len(before), sum(r["is_clicked"] for r in before))


def test_a_days_pairs_have_exactly_the_features_rerank_computes_for_that_day(tmp_path, make_settings):
    """Train as you serve: for every user and ad of a day, its pairs and the rerank inputs of that run_date
    carry the same texts, counts and past impressions, feature for feature."""
    data = {"history_length": 3, "shown_history_length": 5}
    settings = make_settings(data=data)
    built = build_pairs(settings)
    pairs = pl.concat([pl.read_parquet(built.paths[s]) for s in ("train", "valid", "test")])
    days = pairs["shown_at"].dt.date().unique().sort().to_list()
    checked_users = 0
    for day in days[len(days) // 2 :]:  # days with history behind them
        ranked = make_settings(data=data, ranking={"run_date": day.isoformat()})
        inputs = build_ranking_inputs(ranked)
        of_day = pairs.filter(pl.col("shown_at").dt.date() == day)
        user_features = ["user_id", "user_text", "user_prior_impressions", "user_prior_clicks", "history_ad_ids"]
        user_features += ["shown_ad_ids", "shown_clicked"]
        shown_ids = set(inputs.users["shown_ad_ids"].explode().drop_nulls())
        assert set(inputs.shown_ads["ad_id"]) == shown_ids  # every shown ad's text, inactive ones too
        from_pairs = of_day.select(user_features).unique().sort("user_id")
        assert from_pairs["user_id"].is_unique().all()  # one set of features per user and day
        both = from_pairs.join(inputs.users.select(user_features), on="user_id", suffix="_rerank")
        for feature in user_features[1:]:
            assert both[feature].to_list() == both[f"{feature}_rerank"].to_list(), (day, feature)
        ad_features = ["ad_id", "ad_text", "ad_prior_impressions", "ad_prior_clicks"]
        ads = of_day.select(ad_features).unique().join(inputs.ads, on="ad_id", suffix="_rerank")
        assert ads.height > 0 and ads["ad_id"].is_unique().all()  # one set of ad counts per ad and day
        for feature in ad_features[1:]:
            assert ads[feature].to_list() == ads[f"{feature}_rerank"].to_list(), (day, feature)
        # the ranked_users slice is the users rerank ranks that day (sql/int_active_users.sql)
        ranked = set(of_day.filter(pl.col("is_ranked_user"))["user_id"])
        assert ranked == set(of_day["user_id"]) & set(inputs.users["user_id"]), day
        checked_users += both.height
    assert checked_users >= 20  # the check covered real overlap, not an empty join


def test_history_items_render_with_their_own_template(tmp_path, make_settings):
    write_logs(tmp_path / "logs", IMPRESSIONS, ADS, USERS)
    data = {"history_length": 2, "history_item_template": "{title} ({category})", "valid_fraction": 0.2}
    _, rows = build_rows(make_settings(data={"logs": str(tmp_path / "logs"), "test_fraction": 0.2, **data}))
    assert rows["9"]["user_text"].endswith("Recently clicked: Alpha (x) | Gamma (x)")
    assert rows["9"]["history_ad_ids"] == ["a1", "a3"]


def test_history_is_point_in_time_and_most_recent_first(pairs):
    _, rows = pairs
    assert rows["1"]["user_text"] == f"age: 30, city: Leeds. Recently clicked: {EMPTY_HISTORY}"
    assert rows["2"]["user_text"].endswith("Recently clicked: Alpha")
    assert rows["3"]["user_text"].endswith("Recently clicked: Alpha")  # the a2 click at the same ts is excluded
    assert rows["4"]["user_text"].endswith("Recently clicked: Beta | Alpha")
    assert rows["5"]["user_text"].endswith("Recently clicked: Gamma | Beta")  # history_length = 2
    assert rows["9"]["user_text"].endswith("Recently clicked: Alpha | Gamma")
    # u2 has no clicks before its own click at impression 10; u1's clicks never leak into u2's text
    assert rows["10"]["user_text"] == f"city: York. Recently clicked: {EMPTY_HISTORY}"


def test_no_click_at_or_after_an_impression_is_in_its_history(pairs):
    _, rows = pairs
    clicks = [
        (r["shown_at"], r["user_id"], title)
        for r in rows.values()
        if r["is_clicked"]
        for title in [r["ad_text"].split(".")[0]]
    ]
    for row in rows.values():
        later = {title for ts, user, title in clicks if user == row["user_id"] and ts >= row["shown_at"]}
        earlier = {title for ts, user, title in clicks if user == row["user_id"] and ts < row["shown_at"]}
        history = set(row["user_text"].split("Recently clicked: ")[1].split(" | ")) - {EMPTY_HISTORY}
        assert not (history & (later - earlier)), row


def test_user_prior_counts_are_point_in_time(pairs):
    _, rows = pairs
    counts = {i: (r["user_prior_impressions"], r["user_prior_clicks"]) for i, r in rows.items()}
    # hand-computed: impression 3 shares its instant with 2, so neither counts the other
    assert counts["1"] == (0, 0) and counts["2"] == (1, 1) and counts["3"] == (1, 1) and counts["4"] == (3, 2)
    assert counts["9"] == (6, 4) and counts["6"] == (0, 0) and counts["10"] == (2, 0)
    for row in rows.values():  # and by brute force, for every impression
        before = [r for r in rows.values() if r["user_id"] == row["user_id"] and r["shown_at"] < row["shown_at"]]
        assert counts[row["impression_id"]] == (len(before), sum(r["is_clicked"] for r in before))


def test_past_impressions_are_point_in_time_most_recent_first_and_capped(tmp_path, make_settings):
    write_logs(tmp_path / "logs", IMPRESSIONS, ADS, USERS)
    data = {"shown_history_length": 3, "valid_fraction": 0.2, "test_fraction": 0.2, "features_as_of": "impression"}
    built, rows = build_rows(make_settings(data={"logs": str(tmp_path / "logs"), **data}))
    # hand-computed: impression 3 shares its instant with 2, so neither is the other's past
    assert rows["1"]["shown_ad_ids"] == [] and rows["3"]["shown_ad_ids"] == ["a1"]
    assert rows["4"]["shown_ad_ids"] == ["a3", "a2", "a1"] and rows["4"]["shown_clicked"] == [False, True, True]
    assert rows["7"]["shown_ad_ids"] == ["a4", "a3", "a3"]  # the latest three of u1's five
    for row in rows.values():  # and by brute force, for every impression
        before = sorted(
            (r for r in rows.values() if r["user_id"] == row["user_id"] and r["shown_at"] < row["shown_at"]),
            key=lambda r: (r["shown_at"], r["impression_id"]),
            reverse=True,
        )[:3]
        assert row["shown_ad_ids"] == [r["ad_id"] for r in before]
        assert row["shown_clicked"] == [r["is_clicked"] for r in before]
    # beside the splits, every ad's text: an inactive ad's (a4) too
    ads = read_ad_texts(built.paths["train"].parent)
    assert set(ads["ad_id"]) == {"a1", "a2", "a3", "a4", "a5"} and ads["ad_text"].null_count() == 0


def test_without_the_affinity_term_no_past_impressions_are_listed(pairs):
    _, rows = pairs
    assert all(row["shown_ad_ids"] == [] and row["shown_clicked"] == [] for row in rows.values())


def test_split_is_by_time(pairs):
    built, rows = pairs
    by_split = {s: [r["shown_at"] for r in rows.values() if r["split"] == s] for s in ("train", "valid", "test")}
    assert max(by_split["train"]) < min(by_split["valid"]) <= max(by_split["valid"]) < min(by_split["test"])
    assert built.rows == {"train": 6, "valid": 2, "test": 2}
    assert built.valid_from == min(by_split["valid"]) and built.test_from == min(by_split["test"])


def test_ad_text_template_ad_counts_and_slices(pairs):
    _, rows = pairs
    assert rows["1"]["ad_text"] == "Alpha. First ad."
    assert rows["2"]["ad_text"] == "Beta."  # missing description leaves no gap
    # hand-computed: each ad's impressions and clicks strictly before the impression (features as of it)
    counts = {i: (r["ad_prior_impressions"], r["ad_prior_clicks"]) for i, r in rows.items()}
    assert [counts[str(i)] for i in range(1, 11)] == [
        *[(0, 0)] * 3,  # each ad's first showing
        (1, 0),  # a3: impression 3
        (0, 0),  # a4's first
        (1, 1),  # a1: impression 1
        (2, 1),  # a1: 1 and 6
        (1, 1),  # a2: 2
        (2, 1),  # a2: 2 and 8
        (2, 1),  # a3: 3 and 4
    ]
    assert [i for i, r in rows.items() if r["is_cold_start"]] == ["1", "2", "3", "5"]  # never shown before
    assert not any(r["is_new_ad"] for r in rows.values())  # every ad was first shown before validation
    # rerank ranks a user on a day when they were shown an ad in the 7 days before it: not on their first day
    assert [i for i, r in rows.items() if not r["is_ranked_user"]] == ["1", "2", "3", "6"]


def test_ad_counts_as_of_the_day_start_leave_the_days_own_impressions_out(day_start_pairs):
    _, rows = day_start_pairs
    counts = {i: (r["ad_prior_impressions"], r["ad_prior_clicks"]) for i, r in rows.items()}
    assert counts["6"] == counts["7"] == (1, 1)  # a1 on 2026-03-03: impression 1, not 6 of the same day
    assert counts["4"] == (1, 0) and counts["10"] == (2, 1)
    assert [i for i, r in rows.items() if r["is_cold_start"]] == ["1", "2", "3", "5"]


def test_max_train_pairs_keeps_the_latest(tmp_path, make_settings):
    write_logs(tmp_path / "logs", IMPRESSIONS, ADS, USERS)
    settings = make_settings(
        data={"logs": str(tmp_path / "logs"), "valid_fraction": 0.2, "test_fraction": 0.2, "max_train_pairs": 2}
    )
    train = pl.read_parquet(build_pairs(settings).paths["train"])
    assert train["impression_id"].to_list() == ["5", "6"]


def test_unknown_template_field_is_a_clear_error(tmp_path, make_settings):
    write_logs(tmp_path / "logs", IMPRESSIONS, ADS, USERS)
    settings = make_settings(data={"logs": str(tmp_path / "logs"), "ad_template": "{title} by {brand}"})
    with pytest.raises(ValueError, match=r"data.ad_template uses \['brand'\].*available: .*'advertiser'"):
        build_pairs(settings)


def test_duckdb_source_gives_the_same_pairs(tmp_path, make_settings, pairs):
    path = tmp_path / "logs.duckdb"
    with duckdb.connect(str(path)) as con:
        for name, rows in (("impressions", IMPRESSIONS), ("ads", ADS), ("users", USERS)):
            con.register("rows", pl.DataFrame(rows).to_arrow())
            con.execute(f"create table {name} as select * from rows")
            con.unregister("rows")
    data = {"history_length": 2, "valid_fraction": 0.2, "test_fraction": 0.2, "features_as_of": "impression"}
    settings = make_settings(data={"logs": str(path), **data})
    built = build_pairs(settings)
    frame = pl.concat([pl.read_parquet(built.paths[s]) for s in ("train", "valid", "test")])
    _, expected = pairs
    assert {r["impression_id"]: r for r in frame.iter_rows(named=True)} == expected


def test_ranking_inputs_use_history_before_run_date(tmp_path, make_settings):
    write_logs(tmp_path / "logs", IMPRESSIONS, ADS, USERS)
    settings = make_settings(data={"logs": str(tmp_path / "logs")}, ranking={"active_window_days": 2})
    inputs = build_ranking_inputs(settings)
    assert inputs.run_date == date(2026, 3, 7)  # the day after the latest impression
    assert inputs.users["user_id"].to_list() == ["u1", "u2"]
    assert inputs.users["user_text"][0].endswith("Recently clicked: Alpha | Gamma | Beta")
    assert inputs.users.select("user_prior_impressions", "user_prior_clicks").rows() == [(7, 4), (3, 1)]
    assert inputs.ads["ad_id"].to_list() == ["a1", "a2", "a3"]  # a4 inactive, a5 not created yet
    assert inputs.ads.select("ad_prior_impressions", "ad_prior_clicks").rows() == [(3, 2), (3, 1), (3, 2)]

    earlier = make_settings(
        data={"logs": str(tmp_path / "logs")}, ranking={"run_date": "2026-03-03", "active_window_days": 1}
    )
    inputs = build_ranking_inputs(earlier)
    assert inputs.users["user_id"].to_list() == ["u1"]  # u2 was not active on 2026-03-02
    assert inputs.users["user_text"][0].endswith(
        "Recently clicked: Gamma | Beta | Alpha"
    )  # a1 click at 2026-03-03 excluded
    assert inputs.users.select("user_prior_impressions", "user_prior_clicks").rows() == [
        (4, 3)
    ]  # imp. 5 is on the run date


def test_under_ecpm_ads_without_a_bid_take_the_default_or_are_left_out(tmp_path, make_settings):
    priced = [ad | {"bid": 0.5} if ad["ad_id"] == "a1" else ad for ad in ADS]  # only a1 has a bid
    write_logs(tmp_path / "logs", IMPRESSIONS, priced, USERS)
    logs = {"logs": str(tmp_path / "logs")}
    by_pctr = build_ranking_inputs(make_settings(data=logs)).ads
    assert by_pctr.select("ad_id", "bid").rows() == [("a1", 0.5), ("a2", None), ("a3", None)]
    left_out = build_ranking_inputs(make_settings(data=logs, ranking={"objective": "ecpm"})).ads
    assert left_out.select("ad_id", "bid").rows() == [("a1", 0.5)]
    defaulted = build_ranking_inputs(make_settings(data=logs, ranking={"objective": "ecpm", "default_bid": 0.2})).ads
    assert defaulted.select("ad_id", "bid").rows() == [("a1", 0.5), ("a2", 0.2), ("a3", 0.2)]


def test_render_profile_skips_empty_values():
    assert render_profile({"age": 30, "city": None, "job": ""}, 100) == "age: 30"
    assert render_profile({"bio": "x" * 50}, 10) == "bio: " + "x" * 10  # huge values are cut


@pytest.mark.fault
def test_a_day_without_impressions_leaves_a_gap_not_an_error(tmp_path, make_settings):
    # impressions on days 0-2 and 4-6; day 3 is empty (a lost partition or a quiet day)
    days = [d for d in range(7) if d != 3]
    rows = [
        imp(10 * d + u, 60 * 24 * d + u, f"u{u % 2 + 1}", f"a{u % 3 + 1}", u % 2 == 0) for d in days for u in range(6)
    ]
    logs = write_logs(tmp_path / "logs", rows, ADS, USERS)
    settings = make_settings(data={"logs": str(logs), "valid_fraction": 0.2, "test_fraction": 0.2})
    built = build_pairs(settings)
    assert sum(built.rows.values()) == len(rows)
    assert not any(
        p["shown_at"].date() == (START + timedelta(days=3)).date()
        for p in pl.read_parquet(built.paths["train"]).iter_rows(named=True)
    )
    assert build_ranking_inputs(settings).run_date == (START + timedelta(days=7)).date()


def test_candidates_table_is_read_from_the_log_source(tmp_path, make_settings):
    logs = write_logs(tmp_path / "logs", IMPRESSIONS, ADS, USERS)
    (logs / "targeting").mkdir()
    rows = [{"user_id": "u1", "ad_id": "a2"}, {"user_id": "u1", "ad_id": "a2"}, {"user_id": None, "ad_id": "a1"}]
    pq.write_table(pa.Table.from_pylist(rows), logs / "targeting" / "part-0.parquet")
    settings = make_settings(data={"logs": str(logs)}, ranking={"candidates_table": "targeting"})
    assert build_ranking_inputs(settings).candidates.rows() == [("u1", "a2")]  # deduplicated, null ids dropped

    pq.write_table(pa.table({"user_id": ["u1"]}), logs / "targeting" / "part-0.parquet")
    with pytest.raises(LogContractError, match=r"targeting\): required column\(s\) \['ad_id'\] missing"):
        build_ranking_inputs(settings)


@pytest.mark.parametrize("max_train_pairs", [None, 100])
def test_a_tiny_batch_size_writes_exactly_the_same_pairs(tmp_path, make_settings, max_train_pairs):
    """Pairs stream out data.pair_batch_rows at a time: the batch size bounds memory, never the output."""
    data = {"history_length": 3, "max_train_pairs": max_train_pairs}
    default = build_pairs(make_settings(data=data))
    frames = {s: pl.read_parquet(default.paths[s]) for s in ("train", "valid", "test")}
    tiny = build_pairs(make_settings(data={**data, "pair_batch_rows": 7}))
    for split in ("train", "valid", "test"):
        assert pl.read_parquet(tiny.paths[split]).equals(frames[split]), split
        assert pq.read_schema(tiny.paths[split]) == pq.read_schema(default.paths[split])
    assert tiny == default  # paths, counts, clicks and cutoffs alike
    assert frames["train"].height == (max_train_pairs or frames["train"].height)
    assert frames["train"]["shown_at"].is_sorted() and frames["train"]["impression_id"].is_unique().all()


def test_the_memory_cap_and_spill_folder_are_set_before_the_first_query(tmp_path, sample_logs):
    """DuckDB cannot move its temp directory once used: open_logs sets both before staging the logs
    (at 20M impressions with a 1 GB cap the staging already spilled, and a later SET failed)."""
    from tasks.config import DataConfig
    from tasks.logs import open_logs

    con = open_logs(str(sample_logs), DataConfig(duckdb_memory_limit="256MB"), spill_dir=tmp_path / "a" / "tmp")
    temp_directory, memory_limit = con.execute(
        "select current_setting('temp_directory'), current_setting('memory_limit')"
    ).fetchone()
    assert temp_directory == str(tmp_path / "a" / "tmp") and (tmp_path / "a" / "tmp").is_dir()
    assert memory_limit.replace(" ", "").upper() in ("256.0MB", "256MB", "244.1MIB", "244.1MB")
