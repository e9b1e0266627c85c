-- int_user_histories: one row per request in history_requests (request_id, user_id, as_of), from
-- sql/int_impression_history_requests.sql or sql/int_ranking_history_requests.sql:
-- the titles of the user's latest $history_length clicked ads shown strictly before as_of,
-- most recent first. Point-in-time: a click at or after as_of never appears.
with clicks as (
    select
        i.user_id,
        i.shown_at,
        a.title,
        row_number() over (partition by i.user_id order by i.shown_at, i.impression_id) as click_seq
    from stg_impressions as i
    inner join stg_ads as a on i.ad_id = a.ad_id
    where i.is_clicked
),

-- one row per (user, timestamp): how many clicks the user made up to and including it
clicks_through_ts as (
    select user_id, shown_at, max(click_seq) as n_clicks
    from clicks
    group by user_id, shown_at
),

prior_clicks as (
    select
        r.request_id,
        r.user_id,
        coalesce(c.n_clicks, 0) as n_prior_clicks
    from history_requests as r
    asof left join clicks_through_ts as c
        on r.user_id = c.user_id and r.as_of > c.shown_at
),

final as (
    select
        p.request_id,
        coalesce(
            list(c.title order by c.click_seq desc) filter (where c.title is not null),
            []
        ) as history_titles
    from prior_clicks as p
    left join clicks as c
        on c.user_id = p.user_id
        and c.click_seq > p.n_prior_clicks - $history_length
        and c.click_seq <= p.n_prior_clicks
    group by p.request_id
)

select * from final
