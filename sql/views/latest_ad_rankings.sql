-- latest_ad_rankings: ad_rankings of the most recent run_date only; one row per user_id x ad_id.
create or replace view latest_ad_rankings as
with rankings as (
    select * from ad_rankings
),

final as (
    select *
    from rankings
    where run_date = (select max(run_date) from rankings)
)

select * from final
