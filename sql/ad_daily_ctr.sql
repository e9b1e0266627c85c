-- ad_daily_ctr: one row per impression_date x ad_id: how often the ad was shown and clicked that day
-- (UTC), counted over the impressions before $until (the run_date of the rerank that publishes it).
with impressions as (
    select * from stg_impressions
    where shown_at < cast($until as date)
),

ads as (
    select * from stg_ads
),

daily as (
    select
        cast(shown_at as date) as impression_date,
        ad_id,
        count(*) as impressions,
        count(*) filter (where is_clicked) as clicks
    from impressions
    group by all
),

final as (
    select
        daily.impression_date,
        daily.ad_id,
        ads.advertiser,
        ads.category,
        daily.impressions,
        daily.clicks,
        daily.clicks / daily.impressions as ctr
    from daily
    left join ads on daily.ad_id = ads.ad_id
)

select * from final
order by impression_date, ad_id
