-- ad_daily_ctr: one row per impression_date x ad_id: the ad's impressions, clicks and CTR that day
-- (sql/ad_daily_ctr.sql, published by each rerank for the days before its run_date). Each publish adds
-- a file per new or changed day; the newest (computed_at) per day wins, so no day counts twice.
-- DDL takes no bound parameters: {glob} is filled with a SQL expression (tasks/publish.py _files_expression).
-- {{ }}: a brace, doubled for str.format.
create or replace view ad_daily_ctr as
with published as (
    -- impression_date from the folder names (impression_date=<date>): a filter on it reads only those folders' files
    select * from read_parquet({glob}, hive_partitioning = true, hive_types = {{'impression_date': date}}, union_by_name = true)
),

final as (
    select *
    from published
    qualify computed_at = max(computed_at) over (partition by impression_date)
)

select * from final
