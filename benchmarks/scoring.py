"""Nightly scoring: its cost (naive vs exhaustive vs two-stage, per stage, projected to 100k x 5k) and how
faithful two-stage ranking is to exhaustive cross-encoder scoring, on a model that learned something.

    python benchmarks/quality.py --data ../shared/datasets/ml-100k --quick   # first: the trained model
    python benchmarks/scoring.py                                              # ~1.5 h on 2 CPU cores

Cost: a cross-encoder is fine-tuned briefly on synthetic logs from adrank's sample generator, its two-tower
distilled exactly as retrain does, then adrank's score_candidates ranks --users users x --ads ads
exhaustively and in two stages at each K. The naive baseline is the tutorial way: every pair padded to max
length, fixed batches in input order, under no_grad. Rates do not depend on what the weights learned.

Fidelity: recall@10 and NDCG@10 of each user's two-stage top 10 against the exhaustive top 10 depend on
what the model learned (a model whose text term is noise ranks by near-ties). So they are measured on the
quality benchmark's seed-42 default checkpoint (--fidelity-checkpoint, trained on ML-100K; its kept step is
recorded and must be > 0), with its two-tower distilled as retrain does, for --fidelity-users users rerank
ranks on the day after the logs (active in the --fidelity-window-days before it) x every active ad, by pCTR
and by eCPM (seeded log-normal bids: MovieLens has none).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.docs_blocks import command_line, hardware, write_block  # noqa: E402
from tasks.config import Settings, load_settings  # noqa: E402
from tasks.model import load_cross_encoder, pick_device  # noqa: E402
from tasks.output_layer import load_calibration  # noqa: E402
from tasks.pairs import RankingInputs, build_pairs, build_ranking_inputs  # noqa: E402
from tasks.sample_data import generate_sample_logs  # noqa: E402
from tasks.score import IMPRESSIONS_PER_ECPM, RankingModel, score_candidates  # noqa: E402
from tasks.train import SELECTION_FILE, fine_tune  # noqa: E402
from tasks.two_tower import distill_two_tower, load_two_tower  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NIGHTLY_USERS, NIGHTLY_ADS = 100_000, 5_000
NAIVE_SAMPLE_PAIRS, NAIVE_BATCH = 256, 32
GEMM_SIZE, GEMM_REPEATS = 2048, 10
RSS_K, RSS_TOP_N = 20, 10  # small K keeps the 10x-users run short; memory does not depend on K much
RSS_REPEATS = 3  # a process's peak RSS varies by ~±100 MiB run to run (allocator, tokenizer threads): median
ECPM_BID_SIGMA = 0.5  # fidelity by eCPM: seeded log-normal bids, a ~2.7x spread between +-1 sigma
FIDELITY_SEED = 42


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20, help="users ranked in the recall workload")
    parser.add_argument("--ads", type=int, default=2000, help="ads in the synthetic market")
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 50, 200], help="stage-1 K values measured")
    parser.add_argument("--rss-users", type=int, default=30, help="users of the 1x peak-RSS run (10x also runs)")
    parser.add_argument("--train-pairs", type=int, default=2000, help="training pairs of the brief fine-tune")
    parser.add_argument("--work", type=Path, default=Path("adrank_home/benchmarks/scoring"), help="scratch folder")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs", help="where benchmarks.md lives")
    parser.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS child runs (a quick look)")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)  # internal: one peak-RSS run
    quality = Path("adrank_home/benchmarks")
    parser.add_argument(
        "--fidelity-checkpoint", type=Path, default=quality / "ml100k" / "tuned-42", help="a trained cross-encoder"
    )
    parser.add_argument(
        "--fidelity-logs", type=Path, default=quality / "ml100k-logs-seed42", help="the logs it was trained on"
    )
    parser.add_argument("--fidelity-users", type=int, default=200, help="users of the fidelity workload")
    parser.add_argument(
        "--fidelity-window-days",
        type=int,
        default=30,
        help="ranking.active_window_days of the fidelity workload (ML-100K has at most ~130 users in a week)",
    )
    parser.add_argument("--skip-fidelity", action="store_true", help="cost only (a quick look)")
    return parser.parse_args()


def settings_for(args: argparse.Namespace) -> Settings:
    work = args.work.resolve()
    return load_settings(
        {
            "home": str(work),
            "data": {"logs": str(work / "logs"), "max_train_pairs": args.train_pairs},
            "training": {"epochs": 1},
            "sample": {"users": max(400, 10 * args.rss_users + 10), "ads": args.ads, "days": 14},
        }
    )


def prepare(settings: Settings) -> Path:
    """Synthetic logs, a briefly fine-tuned cross-encoder and its distilled two-tower; returns the checkpoint."""
    checkpoint = settings.checkpoints_dir / "bench"
    generate_sample_logs(settings.sample, Path(settings.data.logs))
    built = build_pairs(settings)
    fine_tune(settings, built.paths["train"], built.paths["valid"], checkpoint)
    distill_two_tower(settings, checkpoint, built.paths["train"])
    return checkpoint


def ranking_model(settings: Settings, checkpoint: Path) -> RankingModel:
    model, tokenizer = load_cross_encoder(str(checkpoint), pick_device())
    return RankingModel(
        model,
        tokenizer,
        load_calibration(checkpoint),
        load_two_tower(checkpoint),
        settings.model.max_seq_length,
        settings.training.eval_batch_size,
    )


def workload(settings: Settings, users: int) -> RankingInputs:
    inputs = build_ranking_inputs(settings)
    if inputs.users.height < users:
        raise SystemExit(f"only {inputs.users.height} active users; lower --users/--rss-users")
    return replace(inputs, users=inputs.users.head(users))


def rank(settings: Settings, model: RankingModel, inputs: RankingInputs, name: str, **ranking) -> tuple:
    config = settings.ranking.model_copy(update=ranking)
    path = settings.staging_dir / f"bench-{name}.parquet"
    stats = score_candidates(model, inputs, config, path)
    return pl.from_arrow(pq.read_table(path)), stats


def gemm_gflops() -> float:
    """Best fp32 matrix-multiply rate of this machine, GFLOP/s."""
    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(GEMM_REPEATS):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * GEMM_SIZE**3 / best / 1e9


def flops_per_pair(model: RankingModel, inputs: RankingInputs) -> float:
    """Mean forward FLOPs of one (user, ad) pair at its real (unpadded) length: per layer, Q/K/V/O
    projections 8*h^2*L, feed-forward 4*h*I*L, attention scores and mixing 4*L^2*h."""
    config = model.cross_encoder.config
    h, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    users = np.repeat(inputs.users["user_text"].to_numpy(), inputs.ads.height).tolist()
    ads = np.tile(inputs.ads["ad_text"].to_numpy(), inputs.users.height).tolist()
    encoded = model.tokenizer(users, ads, truncation="longest_first", max_length=model.max_length)
    lengths = np.array([len(ids) for ids in encoded["input_ids"]], dtype=np.float64)
    return float(np.mean(layers * (8 * h * h * lengths + 4 * h * inner * lengths + 4 * lengths**2 * h)))


def naive_pairs_per_second(model: RankingModel, inputs: RankingInputs) -> float:
    """The tutorial way on a sample of pairs: pad everything to max_length, batches in input order."""
    users = np.repeat(inputs.users["user_text"].to_numpy(), inputs.ads.height)[:NAIVE_SAMPLE_PAIRS].tolist()
    ads = np.tile(inputs.ads["ad_text"].to_numpy(), inputs.users.height)[:NAIVE_SAMPLE_PAIRS].tolist()
    model.cross_encoder.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(users), NAIVE_BATCH):
            batch = model.tokenizer(
                users[i : i + NAIVE_BATCH],
                ads[i : i + NAIVE_BATCH],
                padding="max_length",
                truncation=True,
                max_length=model.max_length,
                return_tensors="pt",
            )
            torch.sigmoid(model.cross_encoder(**batch).logits)
    return len(users) / (time.perf_counter() - start)


def agreement(candidate: pl.DataFrame, exhaustive: pl.DataFrame, k: int = 10, key: str = "pctr") -> tuple[float, float]:
    """Mean recall@k and NDCG@k of candidate's top k against the exhaustive ranking by key (pctr or ecpm;
    gains: the exhaustive key)."""
    recalls, ndcgs = [], []
    discounts = 1 / np.log2(np.arange(2, k + 2))
    for user, truth in exhaustive.group_by("user_id", maintain_order=True):
        truth = truth.sort(key, "ad_id", descending=[True, False])
        gains = dict(zip(truth["ad_id"], truth[key], strict=True))
        mine = candidate.filter(pl.col("user_id") == user[0]).sort(key, "ad_id", descending=[True, False])
        top_true, top_mine = truth["ad_id"].head(k).to_list(), mine["ad_id"].head(k).to_list()
        recalls.append(len(set(top_true) & set(top_mine)) / len(top_true))
        ideal = float(np.sum(np.array([gains[a] for a in top_true]) * discounts[: len(top_true)]))
        got = float(np.sum(np.array([gains.get(a, 0.0) for a in top_mine]) * discounts[: len(top_mine)]))
        ndcgs.append(got / ideal if ideal > 0 else 1.0)
    return float(np.mean(recalls)), float(np.mean(ndcgs))


def rss_child(args: argparse.Namespace) -> None:
    """One two-stage ranking of --rss-child users; prints this process's peak RSS in MiB."""
    settings = settings_for(args)
    model = ranking_model(settings, settings.checkpoints_dir / "bench")
    inputs = workload(settings, args.rss_child)
    rank(settings, model, inputs, f"rss-{args.rss_child}", candidates_k=RSS_K, top_n=RSS_TOP_N)
    print(json.dumps({"peak_rss_mib": peak_rss_of_this_process_mib()}))


def peak_rss_of_this_process_mib() -> float:
    """VmHWM, the peak resident set of this process's own memory. Not getrusage's ru_maxrss: Linux carries
    that across exec, so a child started from this (larger) benchmark process would report the parent's."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 1024


def peak_rss_mib(args: argparse.Namespace, users: int) -> float:
    """Median peak RSS of RSS_REPEATS child processes ranking `users` users."""
    command = [sys.executable, __file__, "--rss-child", str(users), "--work", str(args.work)]
    command += ["--rss-users", str(args.rss_users), "--ads", str(args.ads), "--train-pairs", str(args.train_pairs)]
    peaks = []
    for _ in range(RSS_REPEATS):
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        peaks.append(json.loads(out.strip().splitlines()[-1])["peak_rss_mib"])
    print(f"peak RSS of {users} users, MiB: {[round(p) for p in peaks]}", flush=True)
    return float(np.median(peaks))


def fidelity(args: argparse.Namespace, ks: list[int]) -> dict:
    """Two-stage vs exhaustive ranking on a trained model (see the module docstring): recall@10 and NDCG@10 at
    each K by pCTR, at the default K by eCPM and with int8 quantisation."""
    home = args.work.resolve() / "fidelity"
    checkpoint = home / "checkpoint"  # a copy: the two-tower is distilled into it, not into the quality run's
    shutil.rmtree(checkpoint, ignore_errors=True)
    shutil.copytree(args.fidelity_checkpoint.resolve(), checkpoint)
    selection = json.loads((checkpoint / SELECTION_FILE).read_text())
    if selection["kept_step"] == 0:
        raise SystemExit(f"{args.fidelity_checkpoint} kept step 0 (it serves the priors alone): not a trained model")
    ranking = {"active_window_days": args.fidelity_window_days}
    settings = load_settings(
        {"home": str(home), "data": {"logs": str(args.fidelity_logs.resolve())}, "ranking": ranking}
    )
    built = build_pairs(settings)
    distill_two_tower(settings, checkpoint, built.paths["train"])  # as retrain does, into the checkpoint
    model = ranking_model(settings, checkpoint)
    ranked = build_ranking_inputs(settings)
    users = ranked.users.sample(min(args.fidelity_users, ranked.users.height), seed=FIDELITY_SEED).sort("user_id")
    bids = np.exp(np.random.default_rng(FIDELITY_SEED).normal(0.0, ECPM_BID_SIGMA, ranked.ads.height))
    inputs = replace(ranked, users=users, ads=ranked.ads.with_columns(bid=pl.Series(bids)))
    print(f"fidelity: {users.height} users x {inputs.ads.height} ads, kept step {selection['kept_step']}", flush=True)
    exhaustive, _ = rank(settings, model, inputs, "fidelity-exhaustive", candidates_k=None, top_n=inputs.ads.height)
    bid_of = dict(inputs.ads.select("ad_id", "bid").iter_rows())
    exhaustive = exhaustive.with_columns(
        ecpm=pl.col("pctr") * pl.col("ad_id").replace_strict(bid_of) * IMPRESSIONS_PER_ECPM
    )
    default_k, rows = settings.ranking.candidates_k, []
    for k, objective, quantize in [
        *[(k, "pctr", False) for k in ks],
        (default_k, "ecpm", False),
        (default_k, "pctr", True),
    ]:
        ranker = model.quantized() if quantize else model
        name = f"K={k} {objective}" + (", int8" if quantize else "")
        candidate, _ = rank(
            settings,
            ranker,
            inputs,
            f"fidelity-{k}-{objective}-{quantize}",
            candidates_k=k,
            top_n=10,
            objective=objective,
        )
        recall, ndcg = agreement(candidate, exhaustive, key=objective)
        rows.append(
            {"method": name, "k": k, "objective": objective, "int8": quantize, "recall@10": recall, "ndcg@10": ndcg}
        )
        print(f"fidelity {name}: recall@10 {recall:.3f}, NDCG@10 {ndcg:.3f}", flush=True)
    default = next(r for r in rows if r["k"] == default_k and r["objective"] == "pctr" and not r["int8"])
    default_ecpm = next(r for r in rows if r["objective"] == "ecpm")
    return {
        "checkpoint": str(args.fidelity_checkpoint),
        "logs": str(args.fidelity_logs),
        "kept_step": selection["kept_step"],
        "run_date": str(inputs.run_date),
        "users": users.height,
        "active_window_days": args.fidelity_window_days,
        "ads": inputs.ads.height,
        "rows": rows,
        "recall_at_10": default["recall@10"],
        "ndcg_at_10": default["ndcg@10"],
        "recall_at_10_ecpm": default_ecpm["recall@10"],
        "ndcg_at_10_ecpm": default_ecpm["ndcg@10"],
    }


def run(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    settings = settings_for(args)
    ks = sorted({*args.ks, settings.ranking.candidates_k})
    faithful = None if args.skip_fidelity else fidelity(args, ks)  # first: it needs the quality run's model
    checkpoint = prepare(settings)
    model = ranking_model(settings, checkpoint)
    inputs = workload(settings, args.users)
    default_k = settings.ranking.candidates_k
    print(f"workload: {inputs.users.height} users x {inputs.ads.height} ads; default K {default_k}", flush=True)

    gemm = gemm_gflops()
    flops = flops_per_pair(model, inputs)
    naive = naive_pairs_per_second(model, inputs)
    rows = [{"method": "naive (padded to max length)", "ce_passes_per_s": naive}]
    exhaustive, stats = rank(settings, model, inputs, "exhaustive", candidates_k=None, top_n=inputs.ads.height)
    # rates count cross-encoder passes actually run (identical text pairs run once): no credit for duplicates
    exhaustive_rate = stats.stage2_unique_texts / stats.seconds["stage2"]
    rows.append({"method": "exhaustive (adrank batching)", "ce_passes_per_s": exhaustive_rate})

    def two_stage(k: int, name: str, quantize: bool = False) -> dict:
        ranker = model.quantized() if quantize else model
        _, s = rank(settings, ranker, inputs, name, candidates_k=k, top_n=k)
        return {
            "method": name,
            "k": k,
            "encodings_per_s": (s.users + s.ads) / s.seconds["encode"],
            "anchor_pairs_per_s": s.anchor_pairs / s.seconds["anchor"] if s.anchor_pairs else None,
            "matmul_pairs_per_s": s.stage1_pairs / s.seconds["stage1"],
            "ce_passes_per_s": s.stage2_unique_texts / s.seconds["stage2"],
        }

    for k in ks:
        rows.append(two_stage(k, f"two-stage K={k}"))
    rows.append(two_stage(default_k, f"two-stage K={default_k}, int8", quantize=True))
    default = next(r for r in rows if r["method"] == f"two-stage K={default_k}")

    naive_hours = NIGHTLY_USERS * NIGHTLY_ADS / naive / 3600
    anchors = settings.stage1.reference_users * NIGHTLY_ADS
    two_stage_hours = (
        (NIGHTLY_USERS + NIGHTLY_ADS) / default["encodings_per_s"]
        + (anchors / default["anchor_pairs_per_s"] if anchors else 0.0)
        + NIGHTLY_USERS * NIGHTLY_ADS / default["matmul_pairs_per_s"]
        + NIGHTLY_USERS * default_k / default["ce_passes_per_s"]
    ) / 3600
    if args.skip_rss:
        rss_1x = rss_10x = float("nan")
    else:
        rss_1x, rss_10x = peak_rss_mib(args, args.rss_users), peak_rss_mib(args, 10 * args.rss_users)
    result = {
        "workload": {"users": inputs.users.height, "ads": inputs.ads.height, "max_seq_length": model.max_length},
        "rows": rows,
        "default_k": default_k,
        "gemm_gflops": gemm,
        "flops_per_pair": flops,
        "cross_encoder_gflops": default["ce_passes_per_s"] * flops / 1e9,
        "cross_encoder_gemm_fraction": default["ce_passes_per_s"] * flops / 1e9 / gemm,
        "fidelity": faithful,
        "kept_step": faithful and faithful["kept_step"],
        "recall_at_10": faithful and faithful["recall_at_10"],
        "recall_at_10_ecpm": faithful and faithful["recall_at_10_ecpm"],
        "projected_hours": {"naive": naive_hours, "two_stage_default_k": two_stage_hours},
        "projected_speedup_vs_naive": naive_hours / two_stage_hours,
        "peak_rss_mib": {f"{args.rss_users} users": rss_1x, f"{10 * args.rss_users} users": rss_10x},
        "rss_ratio_10x_users": rss_10x / rss_1x,
        "hardware": hardware(),
        "seconds": round(time.monotonic() - started, 1),
        "command": command_line(),
    }
    write_outputs(args, result)
    return result


def markdown(result: dict) -> str:
    columns = [
        "method",
        "encodings_per_s",
        "anchor_pairs_per_s",
        "matmul_pairs_per_s",
        "ce_passes_per_s",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in result["rows"]:
        cells = [row.get(c) for c in columns]
        lines.append(
            "| "
            + " | ".join("" if v is None else f"{v:,.3g}" if isinstance(v, float) else str(v) for v in cells)
            + " |"
        )
    hours = result["projected_hours"]
    return (
        f"Command: `{result['command']}` · {result['hardware']} · wall time {result['seconds'] / 60:.1f} min  \n"
        f"Workload: {result['workload']['users']} users × {result['workload']['ads']} ads (sample generator), "
        f"default K = {result['default_k']}\n\n"
        + "\n".join(lines)
        + "\n\n"
        + f"- fp32 matrix multiply ({GEMM_SIZE}²): {result['gemm_gflops']:.0f} GFLOP/s; cross-encoder stage at "
        f"K={result['default_k']}: {result['cross_encoder_gflops']:.0f} GFLOP/s "
        f"({result['flops_per_pair'] / 1e9:.2f} GFLOP per pair) = "
        f"**{result['cross_encoder_gemm_fraction']:.0%}** of the matrix-multiply rate\n"
        f"- projected nightly rerank of {NIGHTLY_USERS:,} users × {NIGHTLY_ADS:,} ads: naive "
        f"{hours['naive']:,.0f} h, two-stage at K={result['default_k']} {hours['two_stage_default_k']:,.1f} h: "
        f"**{result['projected_speedup_vs_naive']:,.0f}×** faster\n"
        f"- peak RSS: {', '.join(f'{k} {v:,.0f} MiB' for k, v in result['peak_rss_mib'].items())} "
        f"(ratio **{result['rss_ratio_10x_users']:.2f}**)\n" + fidelity_markdown(result["fidelity"])
    )


def fidelity_markdown(faithful: dict | None) -> str:
    if faithful is None:
        return "\nFidelity not measured (--skip-fidelity).\n"
    lines = ["| stage 1 keeps K | ranked by | recall@10 | NDCG@10 |", "|---|---|---|---|"]
    for row in faithful["rows"]:
        lines.append(
            f"| {row['k']} | {row['objective']}{' (int8 cross-encoder)' if row['int8'] else ''} | "
            f"{row['recall@10']:.3f} | {row['ndcg@10']:.3f} |"
        )
    return (
        f"\nFidelity of two-stage ranking to exhaustive cross-encoder scoring, on the quality benchmark's trained "
        f"default (`{faithful['checkpoint']}`, kept step {faithful['kept_step']}): {faithful['users']} users rerank "
        f"ranks on {faithful['run_date']} × {faithful['ads']} active ads; eCPM with seeded log-normal bids "
        f"(σ = {ECPM_BID_SIGMA}):\n\n" + "\n".join(lines) + "\n"
    )


def write_outputs(args: argparse.Namespace, result: dict) -> None:
    (args.out_dir / "benchmarks").mkdir(parents=True, exist_ok=True)
    (args.out_dir / "benchmarks" / "scoring.json").write_text(json.dumps(result, indent=2) + "\n")
    write_block(args.out_dir / "benchmarks.md", "scoring", markdown(result), "Nightly scoring: two-stage rerank")


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.rss_child:
        rss_child(arguments)
    else:
        outcome = run(arguments)
        print(markdown(outcome))
