-- stg_candidates: the optional candidates table (ranking.candidates_table), one row per allowed
-- (user_id, ad_id); ids as text like the other staging tables, rows with a null id dropped.
select distinct
    cast(user_id as varchar) as user_id,
    cast(ad_id as varchar) as ad_id
from raw_candidates
where user_id is not null and ad_id is not null
