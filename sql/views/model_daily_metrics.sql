-- model_daily_metrics: one row per run_date x slice: how the model version that ranked
-- run_date did on that day's impressions (flows/monitor.py; columns in docs/data.md).
-- Like ad_rankings, each monitor run adds a file per run_date and the newest (computed_at) wins.
-- DDL takes no bound parameters: `published` is filled in with the scans of the files (tasks/warehouse.py _published_sql).
create or replace view model_daily_metrics as
with published as (
    -- every publish: one scan per schema folder (sql/views/published_files.sql)
    {published}
),

final as (
    select *
    from published
    qualify computed_at = max(computed_at) over (partition by run_date)
)

select * from final
