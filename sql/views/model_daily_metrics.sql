-- model_daily_metrics: one row per run_date x slice: how the model version that ranked
-- run_date did on that day's impressions (flows/monitor.py; columns in docs/data.md).
-- Like ad_rankings, a Delta table partitioned by run_date: each monitor run replaces its dates whole.
-- DDL takes no bound parameters: `published` is filled in with the table's delta_scan (tasks/warehouse.py).
create or replace view model_daily_metrics as
with published as (
    select * from {published}
),

final as (
    select * from published
)

select * from final
