-- int_active_ads: one row per ad that is active and created before $run_date.
with ads as (
    select * from stg_ads
),

final as (
    select ad_id
    from ads
    where is_active
        and (created_at is null or created_at < cast($run_date as timestamp))
)

select * from final
order by ad_id
