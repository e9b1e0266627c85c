"""Shared fixtures: a tiny randomly initialised BERT, small sample logs, settings under tmp dirs."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from prefect.testing.utilities import prefect_test_harness
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from tasks.config import SampleDataConfig, Settings, load_settings, packaged_model_path
from tasks.sample_data import generate_sample_logs

TINY_BERT = BertConfig(
    vocab_size=30522,  # the packaged MiniLM tokenizer's vocabulary
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=256,
    num_labels=1,
)
SMALL_MARKET = SampleDataConfig(
    users=40, advertisers=6, ads=14, days=10, requests_per_user_day=1.5, ads_per_request=1, cold_start_days=2
)


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (temporary server on a local SQLite database) for flow runs."""
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with random weights, saved in Hugging Face format with a real tokenizer."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertForSequenceClassification(TINY_BERT).save_pretrained(path)
    AutoTokenizer.from_pretrained(packaged_model_path()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sample_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sample") / "logs"
    generate_sample_logs(SMALL_MARKET, path)
    return path


def build_settings(home: Path, model_dir: Path, logs: Path, **overrides: Any) -> Settings:
    """Settings with state under home, the given model and logs, small batches; sections merge overrides."""
    base: dict[str, Any] = {
        "home": str(home),
        "data": {"logs": str(logs)},
        "model": {"base_model": str(model_dir), "max_seq_length": 64},
        "training": {"epochs": 1, "batch_size": 32, "learning_rate": 1e-3, "eval_batch_size": 128},
    }
    for section, values in overrides.items():
        base[section] = {**base[section], **values} if isinstance(values, dict) and section in base else values
    return load_settings(base)


@pytest.fixture
def make_settings(tmp_path: Path, tiny_model_dir: Path, sample_logs: Path):
    def make(**overrides: Any) -> Settings:
        return build_settings(tmp_path / "home", tiny_model_dir, sample_logs, **overrides)

    return make


def write_logs(root: Path, impressions: list[dict], ads: list[dict], users: list[dict]) -> Path:
    """Write hand-made rows in the log contract as Parquet folders under root."""
    for name, rows in (("impressions", impressions), ("ads", ads), ("users", users)):
        columns = list(dict.fromkeys(key for row in rows for key in row))  # rows may omit optional keys
        (root / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]), root / name / "part-0.parquet"
        )
    return root


# good ads (clicked 70%) sell running gear, bad ones (5%) a tax report; one of each starts every day
GOOD_ITEMS = ["shoes", "socks", "shorts", "jackets", "caps", "gloves", "bottles", "bags", "vests", "tights"]
BAD_PERIODS = ["quarterly", "annual", "monthly", "weekly", "interim", "final", "draft", "revised", "audited", "summary"]
SIGNAL_ADS = [
    ad
    for day, (item, period) in enumerate(zip(GOOD_ITEMS, BAD_PERIODS, strict=True))
    for ad in (
        {"ad_id": f"good{day + 1}", "title": f"Buy trail running {item} now", "description": "Free delivery."},
        {"ad_id": f"bad{day + 1}", "title": f"Read the {period} tax report", "description": "Forms attached."},
    )
]
SIGNAL_START = datetime(2026, 5, 1)


@pytest.fixture(scope="session")
def signal_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Logs where the ad text decides the click (good* 70%, bad* 5%): any working model learns it. A good and
    a bad ad start each day, so every day (validation and test included) has ads never shown before, which
    only the text can tell apart: the text adds to the ads' click counts."""
    rng = np.random.default_rng(5)
    users = [
        {"user_id": f"u{u}", "age": int(rng.integers(18, 80)), "city": str(rng.choice(["Leeds", "York"]))}
        for u in range(24)
    ]
    impressions = []
    for i in range(1440):
        shown_at = SIGNAL_START + timedelta(minutes=10 * i)
        live = SIGNAL_ADS[: 2 * ((shown_at - SIGNAL_START).days + 1)]
        ad = live[int(rng.integers(len(live)))]
        p_click = 0.7 if ad["ad_id"].startswith("good") else 0.05
        impressions.append(
            {
                "impression_id": i,
                "ts": shown_at,
                "user_id": f"u{int(rng.integers(24))}",
                "ad_id": ad["ad_id"],
                "clicked": bool(rng.random() < p_click),
                "position": int(rng.integers(1, 4)),
            }
        )
    return write_logs(tmp_path_factory.mktemp("signal") / "logs", impressions, SIGNAL_ADS, users)


SIGNAL_TRAINING = {"epochs": 4, "batch_size": 16, "learning_rate": 2e-3, "warmup_ratio": 0.0}
# 72 test pairs: an ECE that noisy (popularity's own is 0.05 there) would make promotion a coin toss. 0.15:
# with the match's best item (model.match_item_share 0.5, 7f474c0) the first version's ECE here is 0.103;
# a calibrated model with spread pCTRs exceeds 0.1 on 72 pairs more often than not
SIGNAL_PROMOTION = {"max_ece": 0.15}
# the flows' version weighs every term of the output layer, the affinity term too (so rerank, explain, the
# monitor and the shards all read each user's past impressions)
SIGNAL_DATA = {"shown_history_length": 20}
SIGNAL_MODEL = {"calibration": "platt+match+affinity+ad_prior+user_prior"}


@pytest.fixture(scope="session")
def first_retrain(prefect_api, tmp_path_factory, tiny_model_dir, signal_logs):
    """The retrain flow on signal_logs: version 1, promoted. Its home is shared: tests that change it
    (test_flows.py) keep to what they add; others copy it first (test_analysts.py)."""
    home = tmp_path_factory.mktemp("flows") / "home"
    settings = build_settings(
        home,
        tiny_model_dir,
        signal_logs,
        data=SIGNAL_DATA,
        model=SIGNAL_MODEL,
        training=SIGNAL_TRAINING,
        promotion=SIGNAL_PROMOTION,
    )
    from flows.retrain import retrain  # imports Prefect flows: only for the tests that run them

    return settings, retrain(settings.model_dump(mode="json"))


@pytest.fixture(scope="session")
def constant_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny BERT with a zeroed classifier: the same score for every pair (test AUC exactly 0.5)."""
    path = tmp_path_factory.mktemp("constant-bert")
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.classifier.weight.zero_()
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def staged(table: pa.Table, folder) -> str:
    """The scores as tasks/score.py stages them: a Parquet file."""
    path = folder / f"scores-{len(list(folder.glob('scores-*')))}.parquet"
    pq.write_table(table, path)
    return path


@pytest.fixture
def scores(tmp_path):
    """Staged scores of two users x three ads; u1's score of ad a is the argument (b and c tie)."""

    def make(pctr_a: float = 0.4):
        table = pa.table(
            {
                "user_id": ["u1", "u1", "u1", "u2", "u2", "u2"],
                "ad_id": ["a", "b", "c", "a", "b", "c"],
                "pctr": [pctr_a, 0.2, 0.2, 0.1, 0.3, 0.05],
            }
        )
        return staged(table, tmp_path)

    return make
