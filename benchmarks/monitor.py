"""Monitor at scale: one monitor run over many days of many impressions, in bounded memory.

    python benchmarks/monitor.py                          # 30 days x 100k impressions a day, ~30 min on 2 cores
    python benchmarks/monitor.py --days 5 --per-day 20000 # a quick look
    python benchmarks/monitor.py --demo                   # the demo market's last two days, packaged MiniLM

--demo: the default sample market; the default model retrained on all but its last two days, each of
those days ranked by rerank the night before, then monitored; prints the metrics table.

Synthetic logs in the log contract (vectorised: users with a gender and age, ads in categories, clicks
from a logistic model of user x category affinity), a model registered by the retrain flow on the first
--train-days days (the tiny random BERT of the tests by default: this measures the pipeline, not the
model; --base-model for a real one), one published ranking per day, then the monitor flow over every
day. Prints wall time, seconds per day and the peak RSS of each day's stretch (flat = bounded).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import threading
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.docs_blocks import DOC, command_line, hardware, write_block  # noqa: E402
from tasks.config import load_settings, packaged_model_path  # noqa: E402
from tasks.evaluate import to_markdown  # noqa: E402
from tasks.publish import publish_rankings  # noqa: E402
from tasks.registry import git_commit  # noqa: E402
from tasks.sql_files import load_sql  # noqa: E402
from tasks.warehouse import table_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
START = date(2026, 1, 1)
CATEGORIES = ["travel", "fitness", "gaming", "cooking", "finance", "fashion", "pets", "garden", "music", "books"]
TOP_N = 5
RSS_SAMPLE_SECONDS = 0.5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=30, help="days monitored (after the training days)")
    parser.add_argument("--per-day", type=int, default=100_000, help="impressions a day")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--ads", type=int, default=500)
    # a week, as a nightly retrain has at least: on a market only 3 days old every count grows by a third a
    # day, and the pCTR's PSI passed 0.25 on the first three monitored days on that alone (3 false alarms)
    parser.add_argument("--train-days", type=int, default=7, help="days the registered model is trained on")
    parser.add_argument("--base-model", help="the model retrained on the first days (default: a tiny random BERT)")
    parser.add_argument("--work", type=Path, default=Path("adrank_home/benchmarks/monitor"), help="scratch folder")
    parser.add_argument("--demo", action="store_true", help="the demo market's last two days instead")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "monitor.json", help="result JSON")
    return parser.parse_args()


def write_logs(args: argparse.Namespace, folder: Path) -> None:
    """users/, ads/ and impressions/date=<day>/ Parquet, one day at a time (memory: one day)."""
    rng = np.random.default_rng(0)
    users = pa.table(
        {
            "user_id": [f"u{u}" for u in range(args.users)],
            "gender": rng.choice(["female", "male"], args.users),
            "age": rng.integers(18, 80, args.users),
        }
    )
    category = rng.integers(len(CATEGORIES), size=args.ads)
    ads = pa.table(
        {
            "ad_id": [f"ad{a}" for a in range(args.ads)],
            "title": [f"Offer {a} for {CATEGORIES[c]} fans" for a, c in enumerate(category)],
            "category": [CATEGORIES[c] for c in category],
            "bid": rng.uniform(0.2, 2.0, args.ads),
        }
    )
    for name, table in (("users", users), ("ads", ads)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / name / "part-0.parquet")
    affinity = rng.normal(-3.0, 1.0, size=(args.users, len(CATEGORIES)))
    for day in range(args.train_days + args.days):
        u = rng.integers(args.users, size=args.per_day)
        a = rng.integers(args.ads, size=args.per_day)
        clicked = rng.random(args.per_day) < 1 / (1 + np.exp(-affinity[u, category[a]]))
        seconds = np.sort(rng.integers(0, 86400, size=args.per_day))
        day_start = datetime.combine(START + timedelta(days=day), datetime.min.time())
        part = folder / "impressions" / f"date={START + timedelta(days=day)}"
        part.mkdir(parents=True, exist_ok=True)
        first_id = day * args.per_day
        pq.write_table(
            pa.table(
                {
                    "impression_id": np.arange(first_id, first_id + args.per_day),
                    "ts": [day_start + timedelta(seconds=int(s)) for s in seconds],
                    "user_id": [f"u{i}" for i in u],
                    "ad_id": [f"ad{i}" for i in a],
                    "clicked": clicked,
                }
            ),
            part / "part-0.parquet",
        )


def tiny_model(folder: Path) -> str:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from tests.conftest import TINY_BERT

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(**TINY_BERT.to_dict())).save_pretrained(folder)
    AutoTokenizer.from_pretrained(packaged_model_path()).save_pretrained(folder)
    return str(folder)


def publish_daily_rankings(args: argparse.Namespace, settings, version: str) -> None:
    """A ranking per monitored day (each user's TOP_N from a seeded draw), published as rerank does."""
    rng = np.random.default_rng(1)
    for day in range(args.train_days, args.train_days + args.days):
        scores = settings.staging_dir / "bench-scores.parquet"
        scores.parent.mkdir(parents=True, exist_ok=True)
        n = args.users * TOP_N
        pq.write_table(
            pa.table(
                {
                    "user_id": [f"u{u}" for u in np.repeat(np.arange(args.users), TOP_N)],
                    "ad_id": [f"ad{a}" for a in (np.arange(n) * 7 + rng.integers(args.ads)) % args.ads],
                    "pctr": rng.uniform(0.01, 0.2, n),
                }
            ),
            scores,
        )
        run_date = START + timedelta(days=day)
        publish_rankings(settings.warehouse, scores, run_date, settings.tracking.registered_model, version, TOP_N)


class RssSampler(threading.Thread):
    """This process's resident memory every RSS_SAMPLE_SECONDS, as (time, MiB)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.running = True

    def run(self) -> None:
        while self.running:
            status = Path("/proc/self/status").read_text()
            rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024
            self.samples.append((time.time(), rss))
            time.sleep(RSS_SAMPLE_SECONDS)


def demo(args: argparse.Namespace) -> None:
    """The demo market's last two days, ranked and monitored with the default model."""
    import duckdb

    from flows.monitor import monitor
    from flows.rerank import rerank
    from flows.retrain import retrain
    from tasks.sample_data import generate_sample_logs

    work = args.work.resolve() / "demo"
    market, trained_on = work / "logs", work / "logs-before-last-two-days"
    sample = load_settings().sample
    days = [sample.start_date + timedelta(days=sample.days - d) for d in (2, 1)]
    if not market.exists():
        generate_sample_logs(sample, market)
        for name in ("users", "ads"):
            shutil.copytree(market / name, trained_on / name)
        for part in (market / "impressions").glob("date=*"):
            if date.fromisoformat(part.name.split("=")[1]) < days[0]:
                shutil.copytree(part, trained_on / "impressions" / part.name)
    home = {"home": str(work / "home")}
    trained = retrain(home | {"data": {"logs": str(trained_on)}})
    served = home | {"data": {"logs": str(market)}}
    for day in days:
        rerank(run_date=day, overrides=served)
    state = monitor(overrides=served, return_state=True)
    warehouse = load_settings(served).warehouse
    with duckdb.connect(str(warehouse), read_only=True) as con:
        table = con.execute(load_sql("analyses/monitor_overview")).pl()
    print(to_markdown(table))
    result = {"version": trained["version"], "state": state.name, "summary": state.result(), "rows": table.to_dicts()}
    out = args.out.with_name("monitor-demo.json")
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")


def main() -> None:
    args = parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if args.demo:
        demo(args)
        return
    from flows.monitor import monitor
    from flows.retrain import retrain

    work = args.work.resolve()
    started = time.monotonic()
    logs, train_logs = work / "logs", work / "train-logs"
    if not logs.exists():
        write_logs(args, logs)
    if not train_logs.exists():  # the first train_days of the same logs
        for name in ("users", "ads"):
            shutil.copytree(logs / name, train_logs / name)
        for day in range(args.train_days):
            part = f"impressions/date={START + timedelta(days=day)}"
            shutil.copytree(logs / part, train_logs / part)
    print(f"logs ready: {time.monotonic() - started:.0f} s", flush=True)

    base_model = args.base_model or tiny_model(work / "tiny-bert")
    overrides = {
        "home": str(work / "home"),
        "data": {"logs": str(train_logs), "max_train_pairs": 5000},
        "model": {"base_model": base_model, "max_seq_length": 64},
        "training": {"epochs": 1, "batch_size": 64},
        "promotion": {"max_ece": 1.0, "max_logloss_gap": 1.0},  # this measures the pipeline, not the model
    }
    trained = retrain(overrides)
    settings = load_settings(overrides | {"data": {"logs": str(logs)}})
    publish_daily_rankings(args, settings, trained["version"])
    print(f"model registered, rankings published: {time.monotonic() - started:.0f} s", flush=True)

    sampler = RssSampler()
    sampler.start()
    monitor_started = time.time()
    state = monitor(overrides=settings.model_dump(mode="json"), return_state=True)
    sampler.running = False
    seconds = time.time() - monitor_started
    summary = state.result()
    # each day's stretch ends when its model_daily_metrics file lands
    metrics_files = table_path(settings.warehouse, "model_daily_metrics").glob("run_date=*/*.parquet")
    ends = sorted(f.stat().st_mtime for f in metrics_files)
    peaks, begin = [], monitor_started
    for end in ends:
        peaks.append(max((rss for t, rss in sampler.samples if begin <= t <= end), default=float("nan")))
        begin = end
    result = {
        "days": len(summary["days"]),
        "impressions_per_day": args.per_day,
        "train_days": args.train_days,
        "monitor_seconds": round(seconds, 1),
        "seconds_per_day": round(seconds / max(len(summary["days"]), 1), 1),
        "peak_rss_mib_first_day": round(peaks[0]),
        "peak_rss_mib_by_day": [round(p) for p in peaks],
        "peak_rss_mib_max": round(max(peaks)),
        "state": state.name,
        # the logs are stationary: every degraded day is a false alarm (each would start a retrain)
        "degraded_days": summary["degraded"],
        "base_model": "tiny random BERT (tests/conftest.py)" if args.base_model is None else args.base_model,
        "command": command_line(),
        "measured_on": date.today().isoformat(),
        "hardware": hardware(),
        "git_commit": git_commit(),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    write_block(DOC, "monitor", markdown(result), "Monitor: 30 days of 100,000 impressions")


def markdown(result: dict) -> str:
    """docs/benchmarks.md's block of a scale run."""
    rss = result["peak_rss_mib_by_day"]
    middle = rss[min(9, len(rss) - 1)]
    degraded = result["degraded_days"]
    alarms = "; ".join(f"{day}: {'; '.join(reasons)}" for day, reasons in sorted(degraded.items()))
    return (
        f"Command: `{result['command']}` at commit `{result['git_commit'][:12]}` · {result['hardware']} · "
        f"{result['base_model']} · {result['measured_on']}\n\n"
        "| days trained on | days monitored | impressions a day | monitor wall time | per day | "
        "peak RSS day 1 → day 10 → last day | "
        "degraded days (false alarms: the logs are stationary) |\n|---|---|---|---|---|---|---|\n"
        f"| {result['train_days']} | {result['days']} | {result['impressions_per_day']:,} | "
        f"{result['monitor_seconds'] / 60:.1f} min | "
        f"{result['seconds_per_day']:.1f} s | {rss[0]:,} → {middle:,} → {rss[-1]:,} MiB | {len(degraded)} |\n"
        + (f"\nDegraded: {alarms}\n" if degraded else "")
    )


if __name__ == "__main__":
    main()
