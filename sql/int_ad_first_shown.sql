-- int_ad_first_shown: one row per ad with impressions: when the logs first show it.
with impressions as (
    select * from stg_impressions
),

final as (
    select ad_id, min(shown_at) as first_shown_at
    from impressions
    group by ad_id
)

select * from final
