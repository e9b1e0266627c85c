-- user_rankings: one user's published ads of $run_date (null: the latest date they were ranked), best first:
-- one row per rank. With $user_id_salt the user is looked up as published: sha256(salt || user_id).
with user_key as (
    select
        case
            when cast($user_id_salt as varchar) is null then cast($user_id as varchar)
            else sha256(cast($user_id_salt as varchar) || cast($user_id as varchar))
        end as user_id
),

rankings as (
    select ad_rankings.*
    from ad_rankings
    inner join user_key on ad_rankings.user_id = user_key.user_id
),

chosen_date as (
    select coalesce(cast($run_date as date), max(run_date)) as run_date
    from rankings
),

final as (
    select
        rankings.run_date,
        rankings.rank,
        rankings.ad_id,
        rankings.pctr,
        rankings.ecpm,
        rankings.model_version
    from rankings
    inner join chosen_date on rankings.run_date = chosen_date.run_date
)

select * from final
order by rank
