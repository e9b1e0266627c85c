-- impression_days: one row per UTC day with at least one impression in the logs.
with impressions as (
    select * from stg_impressions
),

final as (
    select distinct cast(shown_at as date) as day
    from impressions
)

select * from final
order by day
