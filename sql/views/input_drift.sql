-- input_drift: one row per run_date x input: population stability index between the
-- model's training window and run_date, and the share of impressions on ads it never saw (docs/data.md).
-- Like ad_rankings, a Delta table partitioned by run_date: each monitor run replaces its dates whole.
-- DDL takes no bound parameters: `published` is filled in with the table's delta_scan (tasks/warehouse.py).
create or replace view input_drift as
with published as (
    select * from {published}
),

final as (
    select * from published
)

select * from final
