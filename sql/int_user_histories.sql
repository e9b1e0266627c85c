-- int_user_histories: one row per request in history_requests (request_id, user_id, as_of), from
-- sql/int_impression_history_requests.sql or sql/int_ranking_history_requests.sql:
-- the ids of the user's latest $history_length clicked ads shown strictly before as_of,
-- most recent first, and how many ads the user was shown and clicked strictly before as_of (the
-- user prior of the output layer), and the user's latest $shown_history_length impressions strictly before as_of
-- (shown_ad_ids and shown_clicked, most recent first: the affinity term, tasks/affinity.py; empty when 0).
-- Point-in-time: nothing shown at or after as_of ever counts.
with clicks as (
    select
        i.user_id,
        i.shown_at,
        i.ad_id,
        row_number() over (partition by i.user_id order by i.shown_at, i.impression_id) as click_seq
    from stg_impressions as i
    where i.is_clicked
),

-- one row per click: the user's latest $history_length clicked ads through it, most recent first. A window
-- over the clicks (a few % of impressions), then an equi-join per request: no list aggregate over every
-- request, which DuckDB cannot spill (at 20M impressions it ran out of memory under a 1 GB cap)
histories_through_click as (
    select
        user_id,
        click_seq,
        list_slice(
            list_reverse(
                list(ad_id) over (
                    partition by user_id order by click_seq
                    rows between greatest($history_length - 1, 0) preceding and current row
                )
            ),
            1,
            $history_length
        ) as history_ad_ids
    from clicks
),

-- one row per (user, timestamp): the user's impressions and clicks up to and including it
counts_through_ts as (
    select
        user_id,
        shown_at,
        cast(sum(count(*)) over by_time as bigint) as n_impressions,
        cast(sum(count(*) filter (where is_clicked)) over by_time as bigint) as n_clicks
    from stg_impressions
    group by user_id, shown_at
    window by_time as (partition by user_id order by shown_at)
),

prior_counts as (
    select
        r.request_id,
        r.user_id,
        coalesce(c.n_impressions, 0) as user_prior_impressions,
        coalesce(c.n_clicks, 0) as user_prior_clicks
    from history_requests as r
    asof left join counts_through_ts as c
        on r.user_id = c.user_id and r.as_of > c.shown_at
),

-- the impressions the requests' lists can hold: per user, from $shown_history_length before the earliest
-- request's count to the latest's (only when the lists are asked for). Rerank asks once per user, so its
-- window below reads users x $shown_history_length rows, not every impression of the logs
shown as (
    select
        user_id,
        ad_id,
        is_clicked,
        row_number() over (partition by user_id order by shown_at, impression_id) as shown_seq
    from stg_impressions
    where $shown_history_length > 0
),

request_ranges as (
    select
        user_id,
        min(user_prior_impressions) - $shown_history_length + 1 as first_seq,
        max(user_prior_impressions) as last_seq
    from prior_counts
    where $shown_history_length > 0
    group by user_id
),

-- one row per kept impression: the user's latest $shown_history_length impressions through it, most recent
-- first, the same window-then-join as the clicks' histories (a request's range is kept whole, so its window
-- sees exactly the impressions before it)
shown_through_impression as (
    select
        s.user_id,
        s.shown_seq,
        list_reverse(list(s.ad_id) over recent) as shown_ad_ids,
        list_reverse(list(s.is_clicked) over recent) as shown_clicked
    from shown as s
    inner join request_ranges as r
        on s.user_id = r.user_id
        and s.shown_seq between r.first_seq and r.last_seq
    window recent as (
        partition by s.user_id order by s.shown_seq
        rows between greatest($shown_history_length - 1, 0) preceding and current row
    )
),

final as (
    select
        p.request_id,
        p.user_prior_impressions,
        p.user_prior_clicks,
        coalesce(h.history_ad_ids, []) as history_ad_ids,
        coalesce(s.shown_ad_ids, []) as shown_ad_ids,
        coalesce(s.shown_clicked, []) as shown_clicked
    from prior_counts as p
    left join histories_through_click as h
        on h.user_id = p.user_id
        and h.click_seq = p.user_prior_clicks
    -- the impressions before as_of are the user's first user_prior_impressions (counted by timestamp)
    left join shown_through_impression as s
        on s.user_id = p.user_id
        and s.shown_seq = p.user_prior_impressions
)

select * from final
