-- Key checks on stg_impressions: one row per violation (at most a few examples each).
with impressions as (
    select * from stg_impressions
),

null_keys as (
    select 'null key' as problem, impression_id, user_id, ad_id, shown_at
    from impressions
    where impression_id is null or user_id is null or ad_id is null or shown_at is null
        or is_clicked is null
    limit 5
),

duplicate_ids as (
    select 'duplicate impression_id' as problem, impression_id, user_id, ad_id, shown_at
    from impressions
    qualify count(*) over (partition by impression_id) > 1
    limit 5
),

unknown_ads as (
    select 'ad_id not in ads' as problem, i.impression_id, i.user_id, i.ad_id, i.shown_at
    from impressions as i
    anti join stg_ads as a on i.ad_id = a.ad_id
    limit 5
),

unknown_users as (
    select 'user_id not in users' as problem, i.impression_id, i.user_id, i.ad_id, i.shown_at
    from impressions as i
    anti join stg_users as u on i.user_id = u.user_id
    limit 5
),

out_of_window as (
    select
        case when shown_at > $latest_allowed then 'ts in the future' else 'ts before data.earliest_ts' end
            as problem,
        impression_id, user_id, ad_id, shown_at
    from impressions
    where shown_at > $latest_allowed or shown_at < $earliest_allowed
    limit 5
),

final as (
    select * from null_keys
    union all select * from duplicate_ids
    union all select * from unknown_ads
    union all select * from unknown_users
    union all select * from out_of_window
)

select * from final
