-- int_impression_history_requests: one row per impression; its user's history is wanted as of the
-- moment the ad was shown.
with impressions as (
    select * from stg_impressions
),

final as (
    select impression_id as request_id, user_id, shown_at as as_of
    from impressions
)

select * from final
