-- int_ranking_ad_requests: one row per ad, its prior counts taken as of the start of $run_date: what the
-- nightly rerank knows (sql/int_ad_prior_counts.sql).
with ads as (
    select * from stg_ads
),

final as (
    select
        ad_id,
        cast($run_date as timestamp) as as_of
    from ads
)

select * from final
