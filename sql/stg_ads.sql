-- stg_ads: one row per ad_id, typed; optional columns are null where the log has none.
with source as (
    select * from raw_ads
),

final as (
    select
        cast(ad_id as varchar) as ad_id,
        cast(title as varchar) as title,
        cast(description as varchar) as description,
        cast(category as varchar) as category,
        cast(advertiser as varchar) as advertiser,
        cast(bid as double) as bid,
        coalesce(cast(active as boolean), true) as is_active,
        cast(created_at as timestamp) as created_at
    from source
)

select * from final
