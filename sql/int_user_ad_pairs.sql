-- int_user_ad_pairs: one row per impression, with the user's point-in-time history and counts, the time
-- split (train < valid < test by shown_at, cut at sql/int_split_cutoffs.sql) and whether the ad is new
-- since the training window.
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
        h.user_prior_impressions,
        h.user_prior_clicks,
        case
            when i.shown_at >= c.test_from then 'test'
            when i.shown_at >= c.valid_from then 'valid'
            else 'train'
        end as split,
        f.first_shown_at >= c.valid_from as is_cold_start
    from impressions as i
    cross join int_split_cutoffs as c
    inner join int_user_histories as h on i.impression_id = h.request_id
    inner join int_ad_first_shown as f on i.ad_id = f.ad_id
)

select * from final
order by shown_at, impression_id
