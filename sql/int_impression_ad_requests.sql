-- int_impression_ad_requests: one row per (ad_id, as_of) of the impressions in history_requests
-- (sql/int_impression_history_requests.sql or sql/int_window_history_requests.sql): the moments each
-- shown ad's prior counts are taken as of, the same as its user's (sql/int_ad_prior_counts.sql).
with requests as (
    select * from history_requests
),

final as (
    select distinct
        i.ad_id,
        r.as_of
    from requests as r
    inner join stg_impressions as i on i.impression_id = r.request_id
)

select * from final
