-- model_versions: one row per registered model version: aliases, training data window, offline test
-- metrics and the promotion decision (tasks/registry.py model_versions). Each retrain, promote and
-- rollback publishes a snapshot of the registry; the newest (snapshot_at) per model_name wins.
-- DDL takes no bound parameters: {glob} is filled with a SQL expression (tasks/publish.py _files_expression).
create or replace view model_versions as
with published as (
    select * from read_parquet({glob}, hive_partitioning = false, union_by_name = true)
),

final as (
    select *
    from published
    qualify snapshot_at = max(snapshot_at) over (partition by model_name)
)

select * from final
