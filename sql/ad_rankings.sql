-- ad_rankings rows for one run: one row per user_id x ad_id among the user's top $top_n ads by
-- $objective: 'pctr', or 'ecpm' (pCTR x bid x 1000; null under pctr).
-- With $user_id_salt (ranking.user_id_salt) user ids are published as HMAC-SHA256(salt, user_id):
-- published_user_id, the Python function tasks/publish.py registers (tasks/user_keys.py).
with scored as (
    select * from scored_ads
),

ranked as (
    select
        user_id,
        ad_id,
        pctr,
        ecpm,
        row_number() over (
            partition by user_id
            order by case when $objective = 'ecpm' then ecpm else pctr end desc, ad_id
        ) as rank
    from scored
),

final as (
    select
        cast($run_date as date) as run_date,
        case
            when cast($user_id_salt as varchar) is null then user_id
            else published_user_id(cast($user_id_salt as varchar), user_id)
        end as user_id,
        ad_id,
        cast(rank as integer) as rank,
        pctr,
        cast(ecpm as double) as ecpm,
        cast($model_name as varchar) as model_name,
        cast($model_version as varchar) as model_version,
        cast($scored_at as timestamp) as scored_at
    from ranked
    where rank <= $top_n
)

select * from final
