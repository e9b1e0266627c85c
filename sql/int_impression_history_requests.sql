-- int_impression_history_requests: one row per impression; the moment its user's history and counts
-- are taken as of. $features_as_of (data.features_as_of) = 'day_start': the start of the impression's
-- day (UTC), which is what the nightly rerank knows when it ranks that day
-- (sql/int_ranking_history_requests.sql); 'impression': the moment the ad was shown (online scoring).
with impressions as (
    select * from stg_impressions
),

final as (
    select
        impression_id as request_id,
        user_id,
        case
            when cast($features_as_of as varchar) = 'day_start' then date_trunc('day', shown_at)
            else shown_at
        end as as_of
    from impressions
)

select * from final
