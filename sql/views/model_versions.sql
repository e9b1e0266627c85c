-- model_versions: one row per registered model version: aliases, training data window, offline test
-- metrics and the promotion decision (tasks/registry.py model_versions). Each retrain, promote and
-- rollback publishes a snapshot of the registry, replacing the model's rows (a Delta table partitioned by
-- model_name) in one commit.
-- DDL takes no bound parameters: `published` is filled in with the table's delta_scan (tasks/warehouse.py).
create or replace view model_versions as
with published as (
    select * from {published}
),

final as (
    select * from published
)

select * from final
