-- top_ranked_ads: which ads do the most users see at the top of the latest rankings?
-- One row per ad_id ranked for the latest run_date.
with rankings as (
    select * from latest_ad_rankings
),

final as (
    select
        run_date,
        ad_id,
        count(*) filter (where rank = 1) as users_ranked_first,
        count(*) as users_in_top_n,
        round(avg(pctr), 4) as mean_pctr
    from rankings
    group by run_date, ad_id
)

select * from final
order by users_ranked_first desc, users_in_top_n desc, ad_id
