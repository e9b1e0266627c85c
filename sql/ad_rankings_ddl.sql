-- ad_rankings: one row per run_date x user_id x ad_id; rank 1 is the ad the model expects the
-- user to click most. A run_date is replaced whole on rerun (see tasks/publish.py).
create table if not exists ad_rankings (
    run_date date not null,
    user_id varchar not null,
    ad_id varchar not null,
    rank integer not null,
    pctr double not null,
    model_name varchar not null,
    model_version varchar not null,
    scored_at timestamp not null
)
