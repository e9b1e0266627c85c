-- Checks on stg_ads and stg_users: one row per violation (at most a few examples each).
-- A repeated id would duplicate every pair and candidate that joins it; a bid is a price per click.
with duplicate_ads as (
    select 'ads' as log_table, 'duplicate ad_id' as problem, ad_id as id, count(*) as row_count
    from stg_ads
    where ad_id is not null
    group by ad_id
    having count(*) > 1
    order by ad_id
    limit 5
),

null_ads as (
    select 'ads' as log_table, 'null ad_id' as problem, null as id, count(*) as row_count
    from stg_ads
    where ad_id is null
    having count(*) > 0
),

bad_bids as (
    select 'ads' as log_table, 'bid not a positive number' as problem, ad_id as id, 1 as row_count
    from stg_ads
    where bid <= 0 or isnan(bid) or isinf(bid)
    order by ad_id
    limit 5
),

duplicate_users as (
    select 'users' as log_table, 'duplicate user_id' as problem, user_id as id, count(*) as row_count
    from stg_users
    where user_id is not null
    group by user_id
    having count(*) > 1
    order by user_id
    limit 5
),

null_users as (
    select 'users' as log_table, 'null user_id' as problem, null as id, count(*) as row_count
    from stg_users
    where user_id is null
    having count(*) > 0
),

final as (
    select * from duplicate_ads
    union all select * from null_ads
    union all select * from bad_bids
    union all select * from duplicate_users
    union all select * from null_users
)

select * from final
