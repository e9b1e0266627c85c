-- next_run_date: one row, the day after the latest impression (the default date to rank for).
with impressions as (
    select * from stg_impressions
),

final as (
    select cast(max(shown_at) as date) + 1 as run_date
    from impressions
)

select * from final
