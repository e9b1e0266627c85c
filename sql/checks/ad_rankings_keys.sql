-- Key checks on staged ad_rankings rows before publishing: one row per violation.
with staged as (
    select * from staged_ad_rankings
),

duplicate_keys as (
    select 'duplicate (run_date, user_id, ad_id)' as problem, user_id, ad_id
    from staged
    group by run_date, user_id, ad_id
    having count(*) > 1
),

null_values as (
    select 'null value' as problem, user_id, ad_id
    from staged
    where run_date is null or user_id is null or ad_id is null or rank is null or pctr is null
),

bad_pctr as (
    select 'pctr outside [0, 1]' as problem, user_id, ad_id
    from staged
    where pctr < 0 or pctr > 1 or isnan(pctr)
),

bad_ecpm as (
    select 'ecpm negative or not a number' as problem, user_id, ad_id
    from staged
    where ecpm < 0 or isnan(ecpm)
),

final as (
    select * from duplicate_keys
    union all select * from null_values
    union all select * from bad_pctr
    union all select * from bad_ecpm
)

select * from final
limit 10
