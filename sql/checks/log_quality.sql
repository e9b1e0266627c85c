-- How often staging applied a documented rule instead of failing (see tasks/logs.py): one row.
select
    (select count(*) from raw_impressions) - (select count(*) from stg_impressions) as duplicate_impressions_dropped,
    (
        select count(*) from raw_ads
        where length(cast(title as varchar)) > $max_text_chars
            or length(cast(description as varchar)) > $max_text_chars
    ) as ad_texts_truncated
