-- user_rankings: one user's published ads of $run_date (null: the latest date they were ranked), best first:
-- one row per rank. $user_ids: every published id that may stand for the user (tasks/user_keys.py).
with user_key as (
    select unnest(cast($user_ids as varchar[])) as user_id
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
