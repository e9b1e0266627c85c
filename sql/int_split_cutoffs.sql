-- int_split_cutoffs: one row, where the time split starts validation and test: the latest
-- ceil(n * $test_fraction) impressions are test, the ceil(n * $valid_fraction) before them validation;
-- equal timestamps never straddle a cutoff.
with impressions as (
    select * from stg_impressions
),

ordered as (
    select
        shown_at,
        row_number() over (order by shown_at, impression_id) as row_num,
        count(*) over () as n_impressions
    from impressions
),

final as (
    select
        min(shown_at) filter (
            where row_num > n_impressions - ceil(n_impressions * ($test_fraction + $valid_fraction))
        ) as valid_from,
        min(shown_at) filter (where row_num > n_impressions - ceil(n_impressions * $test_fraction)) as test_from
    from ordered
)

select * from final
