-- Remove one run_date from ad_rankings; runs in the publishing transaction before the new rows go in.
delete from ad_rankings
where run_date = $run_date
