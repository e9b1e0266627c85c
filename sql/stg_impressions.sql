-- stg_impressions: one row per impression_id, typed and renamed from the raw log. Rows repeated
-- exactly (at-least-once delivery) are kept once; the same id with different values is a key error.
with source as (
    select * from raw_impressions
),

final as (
    select distinct
        cast(impression_id as varchar) as impression_id,
        cast(ts as timestamp) as shown_at,
        cast(user_id as varchar) as user_id,
        cast(ad_id as varchar) as ad_id,
        cast(clicked as boolean) as is_clicked,
        cast(position as integer) as position
    from source
)

select * from final
