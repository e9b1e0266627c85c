-- offline_vs_online_auc: did each version's test-split AUC hold up on the days it ranked?
-- One row per ranked run_date: the version that ranked it, its offline test AUC (model_versions) and,
-- once the monitor has seen the day's impressions, its AUC and calibration on them (model_daily_metrics).
with rankings as (
    select * from ad_rankings
),

versions as (
    select * from model_versions
),

metrics as (
    select * from model_daily_metrics
    where slice = 'overall'
),

ranked_days as (
    select
        run_date,
        model_name,
        model_version,
        count(distinct user_id) as users
    from rankings
    group by run_date, model_name, model_version
),

final as (
    select
        ranked_days.run_date,
        ranked_days.model_version,
        ranked_days.users,
        round(versions.test_auc, 3) as offline_test_auc,
        metrics.impressions,
        round(metrics.auc, 3) as online_auc,
        round(metrics.calibration_ratio, 3) as calibration_ratio
    from ranked_days
    left join versions
        on ranked_days.model_name = versions.model_name and ranked_days.model_version = versions.model_version
    left join metrics
        on ranked_days.run_date = metrics.run_date and ranked_days.model_version = metrics.model_version
)

select * from final
order by run_date
