-- int_user_ad_pairs: one row per impression, with the user's and the ad's point-in-time counts (as of the
-- moment in history_requests), the user's history, the time split (train < valid < test by shown_at, cut at
-- sql/int_split_cutoffs.sql) and the slices it belongs to: is_ranked_user (rerank ranks the user that day),
-- is_cold_start (the ad was never shown before: no count, no history mention, no training pair) and
-- is_new_ad (first shown after the training window: the fine-tuned model never saw it).
with impressions as (
    select * from stg_impressions
),

final as (
    select
        i.impression_id,
        i.shown_at,
        i.user_id,
        i.ad_id,
        i.is_clicked,
        i.position,
        h.history_ad_ids,
        h.shown_ad_ids,
        h.shown_clicked,
        h.user_prior_impressions,
        h.user_prior_clicks,
        a.ad_prior_impressions,
        a.ad_prior_clicks,
        case
            when i.shown_at >= c.test_from then 'test'
            when i.shown_at >= c.valid_from then 'valid'
            else 'train'
        end as split,
        d.is_ranked_user,
        a.ad_prior_impressions = 0 as is_cold_start,
        f.first_shown_at >= c.valid_from as is_new_ad
    from impressions as i
    cross join int_split_cutoffs as c
    inner join history_requests as r on i.impression_id = r.request_id
    inner join int_user_histories as h on i.impression_id = h.request_id
    inner join int_ad_prior_counts as a on i.ad_id = a.ad_id and r.as_of = a.as_of
    inner join int_ranked_user_days as d on i.user_id = d.user_id and cast(i.shown_at as date) = d.shown_on
    inner join int_ad_first_shown as f on i.ad_id = f.ad_id
)

select * from final
order by shown_at, impression_id
