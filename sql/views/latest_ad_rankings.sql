-- latest_ad_rankings: ad_rankings of the most recent run_date only; one row per user_id x ad_id.
-- The newest date with a file comes from the run_date of every file (the folder names: no data column is
-- read, though every file is opened), so the window that picks the newest date runs over the last week's
-- rows only, not over every date's. That lookup lists the files apart from ad_rankings' own scans: a date
-- published in between is one ad_rankings has not seen, so the newest date is chosen again among the rows
-- ad_rankings read (a whole publish, never a mix; empty only if such a date comes more than 7 days after
-- the one before, while the query runs).
-- DDL takes no bound parameters: `published` is filled in with the scans of the files (tasks/warehouse.py _published_sql).
create or replace view latest_ad_rankings as
with published as (
    -- every publish: one scan per schema folder (sql/views/published_files.sql)
    {published}
),

final as (
    select *
    from ad_rankings
    where run_date >= (select max(run_date) from published) - 7
    qualify run_date = max(run_date) over ()
)

select * from final
