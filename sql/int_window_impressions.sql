-- int_window_impressions: one row per request of int_window_history_requests: the impression, the
-- user's history and counts as of the start of its day, and the ad inputs the monitor watches for
-- drift (category; age in days since created_at, or since first shown when the log has no created_at).
with requests as (
    select * from history_requests
),

impressions as (
    select * from stg_impressions
),

final as (
    select
        i.impression_id,
        i.shown_at,
        i.user_id,
        i.ad_id,
        i.is_clicked,
        h.user_prior_impressions,
        h.user_prior_clicks,
        h.history_ad_ids,
        a.category,
        date_diff('second', coalesce(a.created_at, f.first_shown_at), i.shown_at) / 86400.0 as ad_age_days
    from requests as r
    inner join impressions as i on i.impression_id = r.request_id
    inner join int_user_histories as h on h.request_id = r.request_id
    inner join stg_ads as a on a.ad_id = i.ad_id
    inner join int_ad_first_shown as f on f.ad_id = i.ad_id
)

select * from final
order by shown_at, impression_id
