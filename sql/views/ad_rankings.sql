-- ad_rankings: one row per run_date x user_id x ad_id; rank 1 is the ad the model expects the user
-- to click most (ranking.objective = pctr) or expects the most revenue from (ecpm). A Delta table
-- partitioned by run_date: each publish of a run_date replaces the date in one commit (tasks/warehouse.py),
-- so a query sees one publish per date, whole, and a filter on run_date opens only that date's files.
-- DDL takes no bound parameters: `published` is filled in with the table's delta_scan (tasks/warehouse.py).
create or replace view ad_rankings as
with published as (
    select * from {published}
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
)

select * from final
