-- int_active_users: one row per user with an impression in [$run_date - $window_days, $run_date).
with impressions as (
    select * from stg_impressions
),

final as (
    select distinct user_id
    from impressions
    where shown_at >= cast($run_date as timestamp) - to_days(cast($window_days as integer))
        and shown_at < cast($run_date as timestamp)
)

select * from final
order by user_id
