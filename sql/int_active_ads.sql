-- int_active_ads: one row per ad that is active and created before $run_date, with the bid that ranks it.
-- Under $objective 'ecpm', an ad without a bid takes $default_bid, or is left out when that is null.
with ads as (
    select * from stg_ads
),

final as (
    select
        ad_id,
        coalesce(bid, cast($default_bid as double)) as bid
    from ads
    where is_active
        and (created_at is null or created_at < cast($run_date as timestamp))
        and ($objective = 'pctr' or coalesce(bid, cast($default_bid as double)) is not null)
)

select * from final
order by ad_id
