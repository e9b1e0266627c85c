-- top_ctr_ads_last_7_days: which ads had the best click-through rate over the last 7 days of logs?
-- One row per ad_id with at least 20 impressions in the 7 days up to the latest impression_date.
with daily as (
    select * from ad_daily_ctr
),

last_7_days as (
    select *
    from daily
    qualify impression_date > max(impression_date) over () - 7
),

final as (
    select
        ad_id,
        any_value(advertiser) as advertiser,
        any_value(category) as category,
        cast(sum(impressions) as bigint) as impressions,
        cast(sum(clicks) as bigint) as clicks,
        round(sum(clicks) / sum(impressions), 4) as ctr
    from last_7_days
    group by ad_id
    having sum(impressions) >= 20
)

select * from final
order by ctr desc, impressions desc, ad_id
