-- predicted_vs_observed_ctr: did the CTR the model predicted for an ad match what users then did?
-- One row per run_date x ad_id ranked and shown that day: the mean pCTR over the users whose top N
-- held the ad, beside the ad's observed CTR over all of that day's impressions (a per-ad glance;
-- model_daily_metrics scores every impression for the exact calibration).
with rankings as (
    select * from ad_rankings
),

daily as (
    select * from ad_daily_ctr
),

predicted as (
    select
        run_date,
        ad_id,
        model_version,
        count(*) as users_ranked,
        avg(pctr) as mean_pctr
    from rankings
    group by run_date, ad_id, model_version
),

final as (
    select
        predicted.run_date,
        predicted.ad_id,
        predicted.model_version,
        predicted.users_ranked,
        round(predicted.mean_pctr, 4) as mean_pctr,
        daily.impressions,
        daily.clicks,
        round(daily.ctr, 4) as observed_ctr
    from predicted
    inner join daily on predicted.run_date = daily.impression_date and predicted.ad_id = daily.ad_id
)

select * from final
order by run_date, ad_id
