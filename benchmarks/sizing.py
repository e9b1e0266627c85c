"""The sizing guide's table (docs/deploy.md): nightly retrain, rerank and monitor time for users x ads x
impressions, on a CPU worker from this project's measured rates, and on one GPU as a projection.

    python benchmarks/sizing.py   # prints the markdown table docs/deploy.md holds

CPU figures: docs/benchmarks/scoring.json (scoring rates per stage, FLOPs per pair), docs/benchmarks/monitor.json
(the monitor's own cost), docs/benchmarks/match_rates.json (the semantic match: tuning and embedding, as ratios
to the cross-encoder's training rate in the same run) and the demo's fine-tune (docs/benchmarks.md): 2 CPU cores.
GPU figures are projected, not measured: the FLOPs per pair at an assumed share of an H100/H200's dense bf16
peak, in series with tokenisation on the GPU node's CPU cores; benchmarks/gpu.sh measures the real ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCORING = json.loads((REPO / "docs/benchmarks/scoring.json").read_text())
MONITOR = json.loads((REPO / "docs/benchmarks/monitor.json").read_text())
MATCH = json.loads((REPO / "docs/benchmarks/match_rates.json").read_text())

# measured on this project's 2-core machine
CPU_TRAIN_PAIRS_PER_S = 26.0  # the demo's fine-tune: 2 x 207 steps of 16 pairs in 251 s (docs/benchmarks.md)
CPU_RATES = {row["method"]: row for row in SCORING["rows"]}["two-stage K=100"]
# the match's rates relative to the cross-encoder's training rate measured in the same run (match_rates.py), at the
# demo's training rate: the machine's speed varies from day to day, ratios within one run do not
MATCH_SPEED = CPU_TRAIN_PAIRS_PER_S / MATCH["cross_encoder_train_pairs_per_s"]
MATCH_TUNE_COST = MATCH["cross_encoder_train_pairs_per_s"] / MATCH["match_tuning_clicks_per_s"]  # pairs per click
TOKENIZE_PAIRS_PER_S_PER_CORE = 3300.0  # tokenize_pairs, one thread, measured under load (a lower bound)
MONITOR_PIPELINE_S_PER_IMPRESSION = MONITOR["seconds_per_day"] / MONITOR["impressions_per_day"]

# projection for one H100/H200-class GPU: assumptions, not measurements
GPU_PEAK_BF16 = 989e12  # dense bf16 FLOP/s, datasheet
GPU_MFU = {"scoring": 0.15, "training": 0.10}  # assumed model FLOP utilisation of a 6-layer, 384-wide encoder
GPU_PEAK_FP32 = 67e12  # dense fp32 FLOP/s, datasheet: the match's item scores (float32 embeddings, torch)
GPU_MATMUL_UTILISATION = 0.5  # assumed share of it a large (items, hidden) x (hidden, ads) product reaches
MATCH_HIDDEN = 384  # the base model's embedding width: 2 x 384 FLOPs per item x ad score
GPU_NODE_CORES = 8  # CPU cores beside the GPU that tokenise
FORWARD_FLOPS = SCORING["flops_per_pair"]  # at the measured workload's real token counts

# the nightly job's shape (defaults of tasks/config.py)
K, REFERENCE_USERS, EPOCHS = 100, 8, 2
TRAIN_DAYS = 14  # days of logs a retrain reads (an assumption of this guide)
VALIDATIONS = EPOCHS + 1  # step 0 and after each epoch
DISTILL_PAIRS = 200 * 20
# a user text's items the match also embeds at rerank (the sample market's ~10), none assumed shared with
# another user's: the worst case (the sample market's 1,165 validation user texts share 576 distinct items)
MATCH_ITEMS_PER_USER = 10
CLICK_RATE = 0.05  # share of training pairs clicked (an assumption: the sample market clicks 15%, news logs 4%)
WINDOW_HOURS = 4.0


@dataclass(frozen=True)
class Rates:
    train: float  # training pairs/s
    score: float  # cross-encoder passes/s (stage 2, validation, test, monitor)
    encode: float  # texts/s encoded for stage 1
    match_embed: float  # texts/s embedded for the semantic match (each user and ad once a night)
    match_tune: float  # clicks/s of the match's tuning (a user text, its items, its ad, the ads passed over)
    match_scores: float  # user item x ad scores/s of the match's best item (torch, on the encoder's device)
    stage1: float = CPU_RATES["matmul_pairs_per_s"]  # user x ad scores/s: numpy on the CPU in both cases
    tokenize: float = math.inf  # pairs/s; on CPU already inside the measured rates


CPU = Rates(
    train=CPU_TRAIN_PAIRS_PER_S,
    score=CPU_RATES["ce_passes_per_s"],
    encode=CPU_RATES["encodings_per_s"],
    match_embed=MATCH["match_embed_texts_per_s"] * MATCH_SPEED,
    match_tune=CPU_TRAIN_PAIRS_PER_S / MATCH_TUNE_COST,
    match_scores=CPU_RATES["matmul_pairs_per_s"],  # measured in numpy; torch on the CPU is no slower
)
_gpu_score = GPU_PEAK_BF16 * GPU_MFU["scoring"] / FORWARD_FLOPS
_gpu_tokenize = TOKENIZE_PAIRS_PER_S_PER_CORE * GPU_NODE_CORES
GPU = Rates(
    train=GPU_PEAK_BF16 * GPU_MFU["training"] / (3 * FORWARD_FLOPS),
    score=1 / (1 / _gpu_score + 1 / _gpu_tokenize),  # predict_logits tokenises a block, then scores it
    encode=1 / (1 / _gpu_score + 1 / _gpu_tokenize),
    # a text is about half a pair's tokens: embedding two costs about one pass; a click of the match's tuning
    # costs what it costs on the CPU in training pairs
    match_embed=2 / (1 / _gpu_score + 1 / _gpu_tokenize),
    match_tune=GPU_PEAK_BF16 * GPU_MFU["training"] / (3 * FORWARD_FLOPS) / MATCH_TUNE_COST,
    match_scores=GPU_PEAK_FP32 * GPU_MATMUL_UTILISATION / (2 * MATCH_HIDDEN),
    tokenize=_gpu_tokenize,
)


def rerank_hours(users: int, ads: int, rates: Rates) -> float:
    """Two-stage rerank at K: encode users and ads (for stage 1 and for the match: each user's items too),
    anchor every ad, score users x ads (and each user item x ad, for the match's best item), rescore users x K."""
    seconds = (
        (users + ads) / rates.encode
        + (users * (1 + MATCH_ITEMS_PER_USER) + ads) / rates.match_embed
        + REFERENCE_USERS * ads / rates.score
        + users * ads / rates.stage1
        + users * ads * MATCH_ITEMS_PER_USER / rates.match_scores
        + users * min(K, ads) / rates.score
    )
    return seconds / 3600


def retrain_hours(impressions_per_day: int, rates: Rates, sample_pairs: int | None = None) -> float:
    """Tune the match on the trained pairs' clicks (one epoch), fine-tune EPOCHS over the training pairs (80% of
    TRAIN_DAYS of impressions, or sample_pairs), validate VALIDATIONS times on 10%, score test (10%) with the
    fine-tuned and the base model, distil the two-tower; the match of validation (twice: zero-shot and tuned,
    for the match's guard) and of test (two texts a pair, at most: identical texts are embedded once; a user
    text's items are short and shared, 576 distinct in the sample market's 7,505 validation pairs, so the
    per-pair count covers them)."""
    pairs = impressions_per_day * TRAIN_DAYS
    trained = min(0.8 * pairs, sample_pairs or math.inf)
    scored = VALIDATIONS * 0.1 * pairs + 2 * 0.1 * pairs + DISTILL_PAIRS
    match = CLICK_RATE * trained / rates.match_tune + 2 * (2 * 0.1 + 0.1) * pairs / rates.match_embed
    seconds = trained / rates.tokenize + EPOCHS * trained / rates.train + scored / rates.score + match
    return seconds / 3600


def monitor_hours(impressions_per_day: int, rates: Rates) -> float:
    """One day monitored: the pipeline's own cost (measured with a tiny model) plus scoring every impression
    (the cross-encoder, and the match of its two texts, which covers the user's items as in retrain_hours)."""
    pipeline = impressions_per_day * MONITOR_PIPELINE_S_PER_IMPRESSION
    scoring = impressions_per_day / rates.score + 2 * impressions_per_day / rates.match_embed
    return (pipeline + scoring) / 3600


SCENARIOS = [(10_000, 1_000, 100_000), (100_000, 5_000, 1_000_000), (1_000_000, 50_000, 10_000_000)]
SAMPLE_PAIRS = 200_000  # training.sample_pairs for the capped column


def table() -> str:
    def h(hours: float) -> str:
        return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:,.1f} h"

    lines = [
        "| users × ads, impressions/day | rerank CPU | rerank GPU* | retrain CPU (all / 200k sampled) "
        "| retrain GPU* (all / sampled) | monitor CPU | monitor GPU* | night CPU → workers for 4 h "
        "| night GPU* → workers for 4 h |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for users, ads, impressions in SCENARIOS:
        cpu = [
            rerank_hours(users, ads, CPU),
            retrain_hours(impressions, CPU, SAMPLE_PAIRS),
            monitor_hours(impressions, CPU),
        ]
        gpu = [rerank_hours(users, ads, GPU), retrain_hours(impressions, GPU), monitor_hours(impressions, GPU)]
        lines.append(
            f"| {users:,} × {ads:,}, {impressions:,} | {h(cpu[0])} | {h(gpu[0])} "
            f"| {h(retrain_hours(impressions, CPU))} / {h(cpu[1])} "
            f"| {h(gpu[1])} / {h(retrain_hours(impressions, GPU, SAMPLE_PAIRS))} "
            f"| {h(cpu[2])} | {h(gpu[2])} | {h(sum(cpu))} → {math.ceil(sum(cpu) / WINDOW_HOURS)} "
            f"| {h(sum(gpu))} → {math.ceil(sum(gpu) / WINDOW_HOURS)} |"
        )
    return "\n".join(lines)


def rates_summary() -> str:
    return (
        f"CPU (measured, 2 cores): training {CPU.train:.0f} pairs/s, cross-encoder {CPU.score:.0f} passes/s, "
        f"stage-1 encodings {CPU.encode:.0f}/s, stage-1 scores {CPU.stage1:.3g}/s, match embeddings "
        f"{CPU.match_embed:.0f} texts/s, match tuning {CPU.match_tune:.0f} clicks/s ({MATCH_TUNE_COST:.1f} "
        f"training pairs' cost each). "
        f"GPU* (projected): training {GPU.train:,.0f} pairs/s, cross-encoder {GPU.score:,.0f} passes/s, match "
        f"embeddings {GPU.match_embed:,.0f} texts/s, match tuning {GPU.match_tune:,.0f} clicks/s, match item "
        f"scores {GPU.match_scores:.3g}/s "
        f"(model alone {_gpu_score:,.0f}/s, tokenisation {_gpu_tokenize:,.0f}/s on {GPU_NODE_CORES} cores)."
    )


if __name__ == "__main__":
    print(rates_summary())
    print()
    print(table())
