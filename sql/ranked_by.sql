-- ranked_by: the model version whose rankings of $run_date analysts see in ad_rankings (null when the date
-- has no publish of $model_name). One publish holds one version, so max() picks that one.
select max(model_version) as model_version
from ad_rankings
where run_date = $run_date and model_name = $model_name
