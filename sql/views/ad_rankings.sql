-- ad_rankings: one row per run_date x user_id x ad_id; rank 1 is the ad the model expects the user
-- to click most (ranking.objective = pctr) or expects the most revenue from (ecpm). Files are never
-- rewritten: each publish of a run_date adds a new file (tasks/publish.py) and this view keeps, per
-- run_date, the rows of its latest publish (scored_at) among the files the query lists, so a query
-- sees one publish per date, whole. The window is partitioned by run_date only, so DuckDB pushes a
-- filter on run_date below it to the scans, which then open only that date's folders (docs/analysts.md).
-- DDL takes no bound parameters: `published` is filled in with the scans of the files (tasks/warehouse.py _published_sql).
create or replace view ad_rankings as
with published as (
    -- every publish: one scan per schema folder (sql/views/published_files.sql)
    {published}
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
