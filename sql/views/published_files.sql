-- One scan of a published table's files (not a view: tasks/warehouse.py joins one per schema folder with
-- `union all by name` into each view's `published`). The files of a schema folder share their columns, so
-- DuckDB binds them from the first file alone (union_by_name = false) and a filter on the date opens only
-- that date's files; files of adrank before schema folders may differ and are read with union_by_name.
-- DDL takes no bound parameters: the files are a SQL expression (tasks/warehouse.py _files_expression).
select * from read_parquet({files}, {hive}, union_by_name = {union_by_name})
