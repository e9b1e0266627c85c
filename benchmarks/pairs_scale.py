"""Pair building at scale: rows/s and peak RSS of build_pairs at 2M and 20M impressions.

    python benchmarks/pairs_scale.py --impressions 2000000
    python benchmarks/pairs_scale.py --impressions 20000000

Synthetic logs go straight to Parquet, one chunk of --chunk-rows at a time (never all in memory): one user
per 20 impressions (1M at 20M) with age, gender and city; one ad per 400 impressions (50k at 20M) with a
title, description and category; impressions spread over --days days in time order, a 5% click rate.
build_pairs then runs in a child process with the default config (data.pair_batch_rows,
data.duckdb_memory_limit); the parent samples the child's RSS every 0.2 s and the child reports its own
VmHWM (the kernel's peak). Results merge into docs/benchmarks/pairs_scale.json, keyed by impressions;
the figure is the ratio of peak RSS between sizes (flat memory: near 1).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
START = datetime(2026, 1, 1)
IMPRESSIONS_PER_USER = 20
IMPRESSIONS_PER_AD = 400
CITIES = ["Leeds", "York", "Bristol", "Glasgow", "Cardiff", "Belfast", "Norwich", "Oxford"]
WORDS = ["trail", "running", "shoes", "wooden", "toys", "kettle", "stroller", "garden", "lamp", "coffee", "socks"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impressions", type=int, nargs="+", default=[2_000_000], help="sizes to measure")
    parser.add_argument("--days", type=int, default=30, help="days the impressions span")
    parser.add_argument("--chunk-rows", type=int, default=1_000_000, help="rows generated and written at a time")
    parser.add_argument("--work", type=Path, default=Path("/tmp/adrank-pairs-scale"), help="logs and homes")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before build_pairs is stopped")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "pairs_scale.json")
    parser.add_argument("--child", nargs=2, metavar=("LOGS", "HOME"), help=argparse.SUPPRESS)
    return parser.parse_args()


def write_logs(root: Path, impressions: int, days: int, chunk_rows: int, seed: int = 13) -> dict[str, int]:
    """Users, ads and impressions in the log contract, chunk by chunk; returns the table sizes."""
    rng = np.random.default_rng(seed)
    n_users, n_ads = max(impressions // IMPRESSIONS_PER_USER, 1), max(impressions // IMPRESSIONS_PER_AD, 1)
    for name in ("users", "ads", "impressions"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for part, first in enumerate(range(0, n_users, chunk_rows)):
        ids = np.arange(first, min(first + chunk_rows, n_users))
        pl.DataFrame(
            {
                "user_id": pl.Series(ids).cast(pl.String),
                "age": rng.integers(18, 80, ids.size),
                "gender": rng.choice(["female", "male"], ids.size),
                "city": rng.choice(CITIES, ids.size),
            }
        ).write_parquet(root / "users" / f"part-{part:04d}.parquet")
    ids = np.arange(n_ads)
    words = np.asarray(WORDS)
    titles = [" ".join(w) for w in words[rng.integers(0, len(WORDS), (n_ads, 3))]]
    pl.DataFrame(
        {
            "ad_id": pl.Series(ids).cast(pl.String),
            "title": [f"Buy the {t}" for t in titles],
            "description": [f"Ad {i}: free delivery on {t}." for i, t in zip(ids, titles, strict=True)],
            "category": rng.choice(WORDS[:5], n_ads),
        }
    ).write_parquet(root / "ads" / "part-0000.parquet")
    seconds = days * 86_400
    for part, first in enumerate(range(0, impressions, chunk_rows)):
        n = min(chunk_rows, impressions - first)
        # each chunk covers its own stretch of time, so the files are in time order like real daily logs
        lo, hi = seconds * first // impressions, seconds * (first + n) // impressions
        offsets = np.sort(rng.integers(lo, max(hi, lo + 1), n))
        ads = np.minimum(rng.zipf(1.3, n) - 1, n_ads - 1)  # a few popular ads, a long tail
        pl.DataFrame(
            {
                "impression_id": np.arange(first, first + n),
                "ts": pl.Series(offsets * 1_000_000).cast(pl.Duration("us")) + START,
                "user_id": pl.Series(rng.integers(0, n_users, n)).cast(pl.String),
                "ad_id": pl.Series(ads).cast(pl.String),
                "clicked": rng.random(n) < 0.05,
            }
        ).write_parquet(root / "impressions" / f"part-{part:04d}.parquet")
    return {"impressions": impressions, "users": n_users, "ads": n_ads}


def run_child(logs: str, home: str) -> None:
    """build_pairs with the default config; prints one JSON line with its wall time, rows and own VmHWM."""
    from tasks.config import Settings
    from tasks.pairs import build_pairs

    settings = Settings(home=home, data={"logs": logs})
    started = time.perf_counter()
    pairs = build_pairs(settings)
    seconds = time.perf_counter() - started
    status = Path("/proc/self/status").read_text()
    hwm_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    print(json.dumps({"seconds": seconds, "rows": pairs.rows, "vmhwm_mib": hwm_kib / 1024}))


def measure(logs: Path, home: Path, timeout: float) -> dict:
    """Run build_pairs in a child, sampling its RSS (and its children's) every 0.2 s."""
    shutil.rmtree(home, ignore_errors=True)
    command = [sys.executable, __file__, "--child", str(logs), str(home)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    process, sampled_peak, started = psutil.Process(child.pid), 0, time.monotonic()
    while child.poll() is None:
        if time.monotonic() - started > timeout:
            child.kill()
            raise TimeoutError(f"build_pairs ran past {timeout} s")
        try:
            sampled_peak = max(sampled_peak, process.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    output = child.stdout.read()
    if child.wait() != 0:
        raise RuntimeError(f"build_pairs failed (exit {child.returncode})")
    result = json.loads(output.strip().splitlines()[-1])
    rows = sum(result["rows"].values())
    return {
        "pairs": result["rows"],
        "seconds": round(result["seconds"], 1),
        "rows_per_s": round(rows / result["seconds"]),
        "peak_rss_mib": round(result["vmhwm_mib"]),
        "sampled_peak_rss_mib": round(sampled_peak / 2**20),
        "wall_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    args = parse_args()
    if args.child:
        run_child(*args.child)
        return
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    for impressions in args.impressions:
        logs = args.work / f"logs-{impressions}"
        started = time.monotonic()
        if logs.exists():
            shutil.rmtree(logs)
        sizes = write_logs(logs, impressions, args.days, args.chunk_rows)
        generated_s = time.monotonic() - started
        run = measure(logs, args.work / f"home-{impressions}", args.timeout)
        run.update(sizes, days=args.days, generate_s=round(generated_s, 1), measured_at=datetime.now().isoformat())
        results["runs"][str(impressions)] = run
        print(f"{impressions:,} impressions: {run['rows_per_s']:,} rows/s, peak RSS {run['peak_rss_mib']:,} MiB")
    sizes = sorted(results["runs"], key=int)
    if len(sizes) > 1:
        low, high = results["runs"][sizes[0]], results["runs"][sizes[-1]]
        results["peak_rss_ratio"] = round(high["peak_rss_mib"] / low["peak_rss_mib"], 2)
        print(f"peak RSS {sizes[-1]} / {sizes[0]}: {results['peak_rss_ratio']}")
    memory_gib = psutil.virtual_memory().total / 2**30
    results["machine"] = f"{platform.machine()}, {psutil.cpu_count()} CPUs, {memory_gib:.0f} GiB"
    results["command"] = "python benchmarks/pairs_scale.py --impressions " + " ".join(sizes)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
