-- ad_daily_ctr: one row per impression_date x ad_id: the ad's impressions, clicks and CTR that day
-- (sql/ad_daily_ctr.sql, published by each rerank for the days before its run_date). A Delta table
-- partitioned by impression_date: a publish replaces each new or changed day whole, so no day counts twice.
-- DDL takes no bound parameters: `published` is filled in with the table's delta_scan (tasks/warehouse.py).
create or replace view ad_daily_ctr as
with published as (
    select * from {published}
),

final as (
    select * from published
)

select * from final
