-- published_rankings: the ad_rankings rows of $run_date as analysts see them (its latest publish).
with rankings as (
    select * from ad_rankings
),

final as (
    select user_id, ad_id, rank, model_version
    from rankings
    where run_date = cast($run_date as date)
)

select * from final
