-- ad_rankings: one row per run_date x user_id x ad_id; rank 1 is the ad the model expects the user
-- to click most (ranking.objective = pctr) or expects the most revenue from (ecpm). Files are never
-- rewritten: each publish of a run_date adds a new file (tasks/publish.py) and this view keeps, per
-- run_date, the rows of its latest publish (scored_at), judged on one listing of the files so a query
-- sees one publish per date, whole. The window is partitioned by run_date only, so DuckDB pushes a
-- filter on run_date below it to the scan, which then opens only that date's folder (docs/analysts.md).
-- DDL takes no bound parameters: {glob} is filled with a SQL expression (tasks/publish.py _files_expression);
-- {{ }}: a brace, doubled for str.format.
create or replace view ad_rankings as
with published as (
    -- run_date from the folder names (run_date=<date>): a filter on it reads only those folders' files
    select * from read_parquet({glob}, hive_partitioning = true, hive_types = {{'run_date': date}}, union_by_name = true)
),

final as (
    select
        run_date,
        user_id,
        ad_id,
        rank,
        pctr,
        ecpm,
        model_name,
        model_version,
        scored_at
    from published
    qualify scored_at = max(scored_at) over (partition by run_date)
)

select * from final
