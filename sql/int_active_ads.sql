-- int_active_ads: one row per ad that is active and created before $run_date, with the bid that ranks it
-- and its prior counts as of the start of $run_date (sql/int_ad_prior_counts.sql over
-- sql/int_ranking_ad_requests.sql). Under $objective 'ecpm', an ad without a bid takes $default_bid, or is
-- left out when that is null.
with ads as (
    select * from stg_ads
),

final as (
    select
        a.ad_id,
        coalesce(a.bid, cast($default_bid as double)) as bid,
        p.ad_prior_impressions,
        p.ad_prior_clicks
    from ads as a
    inner join int_ad_prior_counts as p on p.ad_id = a.ad_id
    where a.is_active
        and (a.created_at is null or a.created_at < cast($run_date as timestamp))
        and ($objective = 'pctr' or coalesce(a.bid, cast($default_bid as double)) is not null)
)

select * from final
order by ad_id
