-- input_drift: one row per run_date x input: population stability index between the
-- model's training window and run_date, and the share of impressions on ads it never saw (docs/data.md).
-- Like ad_rankings, each monitor run adds a file per run_date and the newest (computed_at) wins.
-- DDL takes no bound parameters: {glob} is filled with a SQL expression (tasks/publish.py _files_expression).
-- {{ }}: a brace, doubled for str.format.
create or replace view input_drift as
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
