-- daily_ctr_trend: how did the click-through rate move, day by day?
-- One row per impression_date: all ads together (CTR = clicks / impressions, not a mean of ad CTRs).
with daily as (
    select * from ad_daily_ctr
),

final as (
    select
        impression_date,
        count(*) as ads_shown,
        cast(sum(impressions) as bigint) as impressions,
        cast(sum(clicks) as bigint) as clicks,
        round(sum(clicks) / sum(impressions), 4) as ctr
    from daily
    group by impression_date
)

select * from final
order by impression_date
