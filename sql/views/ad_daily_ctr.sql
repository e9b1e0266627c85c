-- ad_daily_ctr: one row per impression_date x ad_id: the ad's impressions, clicks and CTR that day
-- (sql/ad_daily_ctr.sql, published by each rerank for the days before its run_date). Each publish adds
-- a file per new or changed day; the newest (computed_at) per day wins, so no day counts twice.
-- DDL takes no bound parameters: `published` is filled in with the scans of the files (tasks/warehouse.py _published_sql).
create or replace view ad_daily_ctr as
with published as (
    -- every publish: one scan per schema folder (sql/views/published_files.sql)
    {published}
),

final as (
    select *
    from published
    qualify computed_at = max(computed_at) over (partition by impression_date)
)

select * from final
