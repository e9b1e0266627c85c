-- int_ranking_history_requests: one row per active user; history as of the start of $run_date.
with users as (
    select * from int_active_users
),

final as (
    select user_id as request_id, user_id, cast($run_date as timestamp) as as_of
    from users
)

select * from final
