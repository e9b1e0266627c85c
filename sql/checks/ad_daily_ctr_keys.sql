-- Key checks on staged ad_daily_ctr rows before publishing: one row per violation.
with staged as (
    select * from staged_ad_daily_ctr
),

duplicate_keys as (
    select 'duplicate (impression_date, ad_id)' as problem, impression_date, ad_id
    from staged
    group by impression_date, ad_id
    having count(*) > 1
),

null_values as (
    select 'null value' as problem, impression_date, ad_id
    from staged
    where impression_date is null or ad_id is null or impressions is null or clicks is null
),

bad_counts as (
    select 'clicks outside [0, impressions]' as problem, impression_date, ad_id
    from staged
    where clicks < 0 or clicks > impressions
),

final as (
    select * from duplicate_keys
    union all select * from null_values
    union all select * from bad_counts
)

select * from final
limit 10
