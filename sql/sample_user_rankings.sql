-- sample_user_rankings: the top $ads_per_user ads of the first $users users (by user_id) of $run_date, as
-- published: one row per user_id x rank. The rerank run's table artifact in Prefect.
with rankings as (
    select * from ad_rankings
    where run_date = cast($run_date as date)
),

sample_users as (
    select distinct user_id from rankings
    order by user_id
    limit $users
),

final as (
    select
        rankings.user_id,
        rankings.rank,
        rankings.ad_id,
        round(rankings.pctr, 4) as pctr,
        round(rankings.ecpm, 4) as ecpm
    from rankings
    inner join sample_users on rankings.user_id = sample_users.user_id
    where rankings.rank <= $ads_per_user
)

select * from final
order by user_id, rank
