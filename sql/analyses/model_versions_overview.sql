-- model_versions_overview: which version is the champion, what was each trained on, how did it test?
-- One row per registered model version, newest first.
with versions as (
    select * from model_versions
),

final as (
    select
        model_name,
        model_version,
        is_champion,
        aliases,
        created_at,
        data_from_at,
        data_until_at,
        round(test_auc, 3) as test_auc,
        round(test_logloss, 4) as test_logloss,
        round(test_ece, 4) as test_ece,
        round(cold_start_auc, 3) as cold_start_auc,
        is_promoted,
        promotion_reason,
        became_champion_at,
        became_champion_reason
    from versions
)

select * from final
order by model_name, created_at desc
