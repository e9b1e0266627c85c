-- latest_ad_rankings: ad_rankings of the most recent run_date only; one row per user_id x ad_id.
-- One scan of ad_rankings (a window, not a subquery), so the latest date is judged on the same files.
create or replace view latest_ad_rankings as
with rankings as (
    select * from ad_rankings
),

final as (
    select *
    from rankings
    qualify run_date = max(run_date) over ()
)

select * from final
