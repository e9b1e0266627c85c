-- int_window_history_requests: one row per impression shown in [$window_from, $window_until), at most
-- $max_rows of them (a fixed pseudo-random choice), its features taken as of the start of its day (UTC):
-- what the nightly rerank knew when it ranked that day. The monitor scores days as they were ranked.
with impressions as (
    select * from stg_impressions
    where shown_at >= cast($window_from as timestamp) and shown_at < cast($window_until as timestamp)
),

final as (
    select
        impression_id as request_id,
        user_id,
        date_trunc('day', shown_at) as as_of
    from impressions
    order by hash(impression_id), impression_id
    limit $max_rows
)

select * from final
