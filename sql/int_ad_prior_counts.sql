-- int_ad_prior_counts: one row per (ad_id, as_of) of ad_requests (sql/int_impression_ad_requests.sql or
-- sql/int_ranking_ad_requests.sql): how many times the ad was shown and clicked strictly before as_of, the
-- ad prior of the output layer. Point-in-time, as the user prior: nothing shown at or after as_of counts,
-- so an ad is cold (0 impressions) until the day after it was first shown, and warm from then on.
with counts_through_ts as (
    select
        ad_id,
        shown_at,
        cast(sum(count(*)) over by_time as bigint) as n_impressions,
        cast(sum(count(*) filter (where is_clicked)) over by_time as bigint) as n_clicks
    from stg_impressions
    group by ad_id, shown_at
    window by_time as (partition by ad_id order by shown_at)
),

final as (
    select
        r.ad_id,
        r.as_of,
        coalesce(c.n_impressions, 0) as ad_prior_impressions,
        coalesce(c.n_clicks, 0) as ad_prior_clicks
    from ad_requests as r
    asof left join counts_through_ts as c
        on r.ad_id = c.ad_id and r.as_of > c.shown_at
)

select * from final
