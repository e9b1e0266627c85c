-- stg_users: one row per user_id; every other column is a profile attribute.
with source as (
    select * from raw_users
),

final as (
    select
        cast(user_id as varchar) as user_id,
        * exclude (user_id)
    from source
)

select * from final
