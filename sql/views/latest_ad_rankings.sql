-- latest_ad_rankings: ad_rankings of the most recent run_date only; one row per user_id x ad_id.
-- The latest date is the newest date folder with a file (every publish has rows), read from the folder
-- names alone, so the window of ad_rankings runs over that date's rows only, not over every date's.
-- DDL takes no bound parameters: `published` is filled in with the scans of the files (tasks/publish.py _published_sql).
create or replace view latest_ad_rankings as
with published as (
    -- every publish: one scan per schema folder (sql/views/published_files.sql)
    {published}
),

final as (
    select *
    from ad_rankings
    where run_date = (select max(run_date) from published)
)

select * from final
