-- stg_ads: one row per ad_id, typed; optional columns are null where the log has none.
-- Titles and descriptions are cut to $max_text_chars characters (counted in checks/log_quality.sql).
with source as (
    select * from raw_ads
),

final as (
    select
        cast(ad_id as varchar) as ad_id,
        left(cast(title as varchar), $max_text_chars) as title,
        left(cast(description as varchar), $max_text_chars) as description,
        cast(category as varchar) as category,
        cast(advertiser as varchar) as advertiser,
        cast(bid as double) as bid,
        coalesce(cast(active as boolean), true) as is_active,
        cast(created_at as timestamp) as created_at
    from source
)

select * from final
