-- model_versions: one row per registered model version: aliases, training data window, offline test
-- metrics and the promotion decision (tasks/registry.py model_versions). Each retrain, promote and
-- rollback publishes a snapshot of the registry; the newest (snapshot_at) per model_name wins.
-- DDL takes no bound parameters: `published` is filled in with the scans of the files (tasks/warehouse.py _published_sql).
create or replace view model_versions as
with published as (
    -- every publish: one scan per schema folder (sql/views/published_files.sql)
    {published}
),

final as (
    select *
    from published
    qualify snapshot_at = max(snapshot_at) over (partition by model_name)
)

select * from final
