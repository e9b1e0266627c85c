-- int_ranked_user_days: one row per (user_id, shown_on) day with impressions (UTC): whether the nightly
-- rerank ranks that user that day, i.e. the user was shown an ad in the $window_days days before it
-- (ranking.active_window_days; the rule of sql/int_active_users.sql, per day). The ranked_users slice.
with user_days as (
    select distinct
        user_id,
        cast(shown_at as date) as shown_on
    from stg_impressions
),

previous_days as (
    select
        user_id,
        shown_on,
        lag(shown_on) over (partition by user_id order by shown_on) as previous_shown_on
    from user_days
),

final as (
    select
        user_id,
        shown_on,
        coalesce(previous_shown_on >= shown_on - cast($window_days as integer), false) as is_ranked_user
    from previous_days
)

select * from final
