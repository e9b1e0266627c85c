-- model_daily_metrics: one row per run_date x slice: how the model version that ranked
-- run_date did on that day's impressions (flows/monitor.py; columns in docs/data.md).
-- Like ad_rankings, each monitor run adds a file per run_date and the newest (computed_at) wins.
-- DDL takes no bound parameters: {glob} is filled with a SQL expression (tasks/publish.py _files_expression).
-- {{ }}: a brace, doubled for str.format.
create or replace view model_daily_metrics as
with published as (
    -- run_date from the folder names (run_date=<date>): a filter on it reads only those folders' files
    select * from read_parquet({glob}, hive_partitioning = true, hive_types = {{'run_date': date}}, union_by_name = true)
),

final as (
    select *
    from published
    qualify computed_at = max(computed_at) over (partition by run_date)
)

select * from final
