-- latest_ad_rankings: ad_rankings of the most recent run_date only; one row per user_id x ad_id.
-- The newest date comes from a scan of run_date alone (a partition column: every file is opened, no data
-- column read), so the window that picks it runs over the last week's rows only. The two scans each read the table's newest commit
-- when the query starts; a date published between them is chosen again among the rows ad_rankings read
-- (a whole publish, never a mix; empty only if a date comes more than 7 days after the one before).
-- DDL takes no bound parameters: `published` is filled in with the table's delta_scan (tasks/warehouse.py).
create or replace view latest_ad_rankings as
with published as (
    select run_date from {published}
),

final as (
    select *
    from ad_rankings
    where run_date >= (select max(run_date) from published) - 7
    qualify run_date = max(run_date) over ()
)

select * from final
