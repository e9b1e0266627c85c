-- input_drift: one row per run_date x input: population stability index between the
-- model's training window and run_date, and the share of impressions on ads it never saw (docs/data.md).
-- Like ad_rankings, each monitor run adds a file per run_date and the newest (computed_at) wins.
-- DDL takes no bound parameters: `published` is filled in with the scans of the files (tasks/warehouse.py _published_sql).
create or replace view input_drift as
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
