-- int_window_impressions: one row per request of int_window_history_requests: the impression, the
-- user's history and the user's and ad's counts as of the start of its day, whether rerank ranked the user
-- that day, when the ad was first shown, and the ad inputs the monitor watches for drift (category; age in
-- days since created_at, or since first shown when the log has no created_at).
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
        h.shown_ad_ids,
        h.shown_clicked,
        p.ad_prior_impressions,
        p.ad_prior_clicks,
        d.is_ranked_user,
        p.ad_prior_impressions = 0 as is_cold_start,
        a.category,
        f.first_shown_at as ad_first_shown_at,
        date_diff('second', coalesce(a.created_at, f.first_shown_at), i.shown_at) / 86400.0 as ad_age_days
    from requests as r
    inner join impressions as i on i.impression_id = r.request_id
    inner join int_user_histories as h on h.request_id = r.request_id
    inner join int_ad_prior_counts as p on p.ad_id = i.ad_id and p.as_of = r.as_of
    inner join int_ranked_user_days as d on d.user_id = i.user_id and d.shown_on = cast(i.shown_at as date)
    inner join stg_ads as a on a.ad_id = i.ad_id
    inner join int_ad_first_shown as f on f.ad_id = i.ad_id
)

select * from final
order by shown_at, impression_id
