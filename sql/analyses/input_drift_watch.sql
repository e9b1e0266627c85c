-- input_drift_watch: which of the model's inputs shifted away from the days before, and how much?
-- One row per run_date x input, the largest shift first; PSI below 0.1 is usually read as stable,
-- 0.1 to 0.25 as a moderate shift, above 0.25 as a major one.
with drift as (
    select * from input_drift
),

final as (
    select
        run_date,
        model_version,
        input,
        round(psi, 3) as psi,
        round(value, 3) as value,
        case
            when psi >= 0.25 then 'major'
            when psi >= 0.1 then 'moderate'
            when psi is not null then 'stable'
        end as shift
    from drift
)

select * from final
order by run_date, psi desc nulls last, input
