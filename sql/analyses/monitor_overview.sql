-- monitor_overview: an operator's morning read of model_daily_metrics, one row per run_date x slice
-- for the overall, ranked-user, cold-ad, seen/unseen-ad, history and gender slices.
with metrics as (
    select * from model_daily_metrics
),

final as (
    select
        run_date,
        model_version,
        slice,
        impressions,
        clicks,
        round(ctr, 4) as ctr,
        round(auc, 3) as auc,
        round(gauc, 3) as gauc,
        round(normalized_entropy, 3) as normalized_entropy,
        round(calibration_ratio, 3) as calibration_ratio,
        round(top_n_coverage, 3) as top_n_coverage,
        round(ctr_in_top_n, 4) as ctr_in_top_n,
        round(ctr_outside_top_n, 4) as ctr_outside_top_n
    from metrics
    where slice in (
        'overall', 'ranked_users', 'cold_start', 'ads_seen', 'ads_unseen', 'users_with_history',
        'users_without_history'
    )
        or slice like 'gender=%'
)

select * from final
order by run_date, slice
