"""Ranking quality on real data, as the nightly job serves it: adrank's cross-encoder against content-aware peers.

    python benchmarks/quality.py --data ../shared/datasets/ml-100k --quick   # ~40 min a seed on 2 idle CPU cores
    python benchmarks/quality.py --data ../shared/datasets/ml-100k           # full: meant for a GPU
    python benchmarks/quality.py --logs /path/to/contract/logs --name mydata  # any data in the log contract

Protocol (benchmarks/protocol.py): for each seed, a seeded 10% of the items is removed from the logs before
the test window, then adrank's own build_pairs builds every feature as of the start of each impression's day
(data.features_as_of, what rerank knows), split at the full logs' time cutoffs (last 10% test, 10% before
validation). Cold slice: test impressions of ads with no train or validation pair. Every model and lever is
chosen on validation; the test split is scored once per run. Peers get the same information at the same
moment (benchmarks/baselines.py::content_features). Intervals: paired user-level bootstrap of the default
minus the best peer, averaged over seeds.
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import re
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import baselines, protocol  # noqa: E402
from benchmarks.movielens import checksum, convert_movielens  # noqa: E402
from tasks.config import Settings, load_settings  # noqa: E402
from tasks.evaluate import evaluation_table, popularity_ctr  # noqa: E402
from tasks.logs import open_logs  # noqa: E402
from tasks.metrics import metrics  # noqa: E402
from tasks.model import Calibration, load_calibration, load_cross_encoder, pick_device, predict_logits  # noqa: E402
from tasks.pairs import build_ranking_inputs, split_fractions, user_history  # noqa: E402
from tasks.registry import configure_tracking  # noqa: E402
from tasks.score import RankingModel, ScoringStats, prepare_stage1, project_users, stage1_scores  # noqa: E402
from tasks.sql_files import materialize  # noqa: E402
from tasks.train import calibrate, fine_tune  # noqa: E402
from tasks.two_tower import distill_two_tower, load_two_tower  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEEDS = (42, 43, 44)  # training seed and cold-item draw
# --quick: the cross-encoders fine-tune 1 epoch on a seeded sample of the train split and validate on a
# sample of validation; peers fit all of train; every model scores the full test split.
QUICK = {"train_pairs": 10000, "valid_pairs": 2000, "epochs": 1, "eval_every_steps": 200}
DEFAULT, HEAD_ONLY = "fine_tuned", "base_trained_head"
TEXT_ONLY, PRIORS_ONLY = "fine_tuned_text_only", "priors_only"  # the default's output layer without priors / text
PEERS = ["popularity", "lightgbm", "deepfm"]
# levers (config overrides) tried with --levers on the first seed against the default, judged on validation only
HISTORY_WITH_GENRES = {"history_length": 5, "history_item_template": "{title} {description}"}
LEVERS = {  # the first two were run when the default was mean pooling: its row is "pooling_mean" today
    "pooling_cls": {"model": {"pooling": "cls"}},
    "history_5_with_genres": {"data": HISTORY_WITH_GENRES},
    "user_prior_offset": {"training": {"user_prior_offset": True}},
    # greedy: on top of the best so far
    "history_5_with_genres+ranking_loss": {"data": HISTORY_WITH_GENRES, "training": {"ranking_loss_weight": 1.0}},
    "history_5_with_genres+prior_offsets": {
        "data": HISTORY_WITH_GENRES,
        "training": {"user_prior_offset": True, "ad_prior_offset": True},
    },
}
# the reported default: adrank's default config with what --levers chose on validation
# (docs/benchmarks/levers-ml100k-quick.json), and mean pooling, which the reported run used (mean and
# [CLS] pooling were within noise of each other on validation; adrank's own default is [CLS])
CHOSEN = {"data": HISTORY_WITH_GENRES, "model": {"pooling": "mean"}}
TWO_STAGE_USERS, TWO_STAGE_KS = 16, (50, 100, 200)
BOOTSTRAP_REPLICATES = 1000
SLICES = ("overall", "cold_start")
REPORTED = ("gauc", "auc", "ndcg@10", "logloss", "ece_equal_mass", "calibration_ratio", "ece", "hit_rate@10")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="MovieLens-100K folder (converted to the log contract)")
    source.add_argument("--logs", type=Path, help="a data set already in adrank's log contract")
    parser.add_argument("--name", default="ml100k", help="data set name in output file names")
    parser.add_argument("--quick", action="store_true", help="subsampled CPU mode (see QUICK)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--levers", action="store_true", help="only compare LEVERS on validation (first seed)")
    parser.add_argument("--only", nargs="+", help="with --levers: just these (the default is fine_tuned)")
    parser.add_argument("--resume", action="store_true", help="reuse seeds already scored in --work")
    parser.add_argument(
        "--two-stage-only",
        action="store_true",
        help="only the two-stage measurement (pCTR and eCPM) on the first seed's model already trained in --work",
    )
    parser.add_argument("--work", type=Path, default=Path("adrank_home/benchmarks"), help="scratch folder")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs", help="where benchmarks.md lives")
    return parser.parse_args()


def bench_settings(args: argparse.Namespace, logs: Path, seed: int, **sections) -> Settings:
    overrides = {
        "home": str(args.work.resolve() / args.name),
        "data": {"logs": str(logs)},
        "tracking": {"experiment": "adrank-benchmarks"},
        "training": {"seed": seed},
        "stage1": {"seed": seed},
    }
    if args.quick:
        overrides["training"] |= {
            "epochs": QUICK["epochs"],
            "sample_pairs": QUICK["train_pairs"],
            "eval_every_steps": QUICK["eval_every_steps"],
        }
    for section, values in sections.items():
        overrides[section] = overrides.get(section, {}) | values
    return load_settings(overrides)


def cutoffs(settings: Settings):
    """valid_from, test_from of the full logs (sql/int_split_cutoffs.sql)."""
    con = open_logs(settings.data.logs, settings.data)
    materialize(con, "int_split_cutoffs", split_fractions(settings.data))
    return con.execute("select valid_from, test_from from int_split_cutoffs").fetchone()


def fine_tuned(settings: Settings, paths: dict[str, Path], out_dir: Path, splits: dict[str, pl.DataFrame]) -> dict:
    """adrank's fine_tune; its validation and test logits; the kept step and its validation scores."""
    result = fine_tune(settings, paths["train"], paths["valid"], out_dir)
    model, tokenizer = load_cross_encoder(str(out_dir), pick_device())
    args = settings.model.max_seq_length, settings.training.eval_batch_size
    logits = {
        name: predict_logits(model, tokenizer, splits[name]["user_text"], splits[name]["ad_text"], *args)
        for name in ("valid", "test")
    }
    kept = next(row for row in result.history if row["step"] == result.best_step)
    if result.best_step == 0:
        print(f"WARNING: {out_dir.name} kept step 0: the untrained model", flush=True)
    return {"logits": logits, "kept_step": result.best_step, "valid": kept, "checkpoint": out_dir}


def output_layer(settings: Settings, method: str, splits: dict, valid_logits: np.ndarray) -> Calibration:
    config = settings.model_copy(update={"model": settings.model.model_copy(update={"calibration": method})})
    return calibrate(config, splits["train"], splits["valid"], valid_logits)


def served(layer: Calibration, test: pl.DataFrame, logits: np.ndarray) -> np.ndarray:
    return layer.apply(logits, test["ad_id"].to_list(), user_history(test))


def prepare_seed(args: argparse.Namespace, logs: Path, seed: int, **overrides) -> tuple:
    """Hold out the seed's cold items, build pairs as of day start and split them: settings, splits, paths."""
    settings = bench_settings(args, logs, seed)
    valid_from, test_from = cutoffs(settings)
    seed_logs = args.work.resolve() / f"{args.name}-logs-seed{seed}"
    cold_items = protocol.hold_out_items(logs, seed_logs, seed, test_from)
    settings = bench_settings(args, seed_logs, seed, **overrides)
    splits = protocol.time_split_pairs(settings, valid_from, test_from)
    if args.quick:
        splits["valid"] = splits["valid"].sample(min(QUICK["valid_pairs"], splits["valid"].height), seed=seed)
    paths = {}
    for name, frame in splits.items():
        paths[name] = settings.pairs_dir / f"bench-{name}.parquet"
        frame.write_parquet(paths[name])
    return settings, splits, paths, {"test_from": test_from, "cold_items": cold_items, "logs": seed_logs}


def merged(*overrides: dict) -> dict:
    """Config overrides merged section by section."""
    out: dict = {}
    for override in overrides:
        for section, values in override.items():
            out[section] = out.get(section, {}) | values
    return out


def run_seed(args: argparse.Namespace, logs: Path, seed: int, first: bool, timings: dict) -> dict:
    """One seed: hold out items, build pairs as of day start, fit every model, score the test split once."""
    settings, splits, paths, held_out = prepare_seed(args, logs, seed, **CHOSEN)
    seed_logs, test_from, cold_items = held_out["logs"], held_out["test_from"], held_out["cold_items"]
    train, valid, test = splits["train"], splits["valid"], splits["test"]

    def timed(name: str, fn, *fn_args):
        start = time.monotonic()
        out = fn(*fn_args)
        timings[f"{name}/{seed}"] = round(time.monotonic() - start, 1)
        print(f"seed {seed} {name}: {timings[f'{name}/{seed}']} s", flush=True)
        return out

    # peers: the same information as of the same moment
    staged = open_logs(str(seed_logs), settings.data)
    users = staged.table("stg_users").pl()
    ads = pl.read_parquet(seed_logs / "ads").with_columns(pl.col("ad_id").cast(pl.String))
    features = {name: baselines.content_features(splits[name], users, ads) for name in splits}
    labels = {name: frame["is_clicked"].cast(pl.Int8).to_numpy() for name, frame in splits.items()}
    predictions = {"popularity": popularity_ctr(train, test)}
    for name, fit in (("lightgbm", baselines.lightgbm), ("deepfm", baselines.deepfm)):
        fit_args = features["train"], labels["train"], features["valid"], labels["valid"], features["test"], seed
        predictions[name] = timed(name, fit, *fit_args)

    # adrank's default; its output layer without text (priors only) and without priors (text only)
    work = args.work.resolve() / args.name
    default = timed(DEFAULT, fine_tuned, settings, paths, work / f"tuned-{seed}", splits)
    method = settings.model.calibration
    layer = output_layer(settings, method, splits, default["logits"]["valid"])
    predictions[DEFAULT] = served(layer, test, default["logits"]["test"])
    text_only = output_layer(settings, "platt", splits, default["logits"]["valid"])
    predictions[TEXT_ONLY] = served(text_only, test, default["logits"]["test"])
    priors = output_layer(settings, method, splits, np.zeros(valid.height, np.float32))
    predictions[PRIORS_ONLY] = served(priors, test, np.zeros(test.height, np.float32))
    kept_step = {DEFAULT: default["kept_step"]}
    validation = {DEFAULT: default["valid"]}

    extra: dict = {}
    if first:  # the head-only peer and the two-stage measurement on one seed
        head = bench_settings(args, seed_logs, seed, **merged(CHOSEN, {"training": {"trainable_layers": 0}}))
        head_only = timed(HEAD_ONLY, fine_tuned, head, paths, work / f"head-only-{seed}", splits)
        head_layer = output_layer(head, method, splits, head_only["logits"]["valid"])
        predictions[HEAD_ONLY] = served(head_layer, test, head_only["logits"]["test"])
        kept_step[HEAD_ONLY], validation[HEAD_ONLY] = head_only["kept_step"], head_only["valid"]
        extra["two_stage"] = timed("two_stage", two_stage_recall, settings, default["checkpoint"], paths, test_from)

    return {
        "seed": seed,
        "test": test.select("user_id", "is_clicked", "is_cold_start"),
        "predictions": predictions,
        "table": evaluation_table(test, predictions),
        "kept_step": kept_step,
        "validation": validation,
        "cold_items": len(cold_items),
        "pairs": {name: frame.height for name, frame in splits.items()},
        **extra,
    }


def run_levers(args: argparse.Namespace, logs: Path) -> dict:
    """The default and each lever on the first seed, judged on validation only (the test split is not read):
    the served score at the kept step (output layer fitted on validation) and its per-user ranking."""
    seed, results = args.seeds[0], {}
    out = args.out_dir / "benchmarks" / f"levers-{args.name}{'-quick' if args.quick else ''}.json"
    for name, overrides in {DEFAULT: {}, **LEVERS}.items():
        if args.only and name not in args.only:
            continue
        started = time.monotonic()
        settings, splits, paths, _ = prepare_seed(args, logs, seed, **overrides)
        tuned = fine_tuned(settings, paths, args.work.resolve() / args.name / f"lever-{name}", splits)
        layer = output_layer(settings, settings.model.calibration, splits, tuned["logits"]["valid"])
        valid = splits["valid"]
        pctr = served(layer, valid, tuned["logits"]["valid"])
        labels = valid["is_clicked"].cast(pl.Int8).to_numpy()
        scores = metrics(labels, pctr, valid["user_id"].to_numpy())
        results[name] = {"overrides": overrides, "kept_step": tuned["kept_step"]} | {
            k: scores[k] for k in ("logloss", "auc", "gauc", "ndcg@10")
        }
        results[name]["seconds"] = round(time.monotonic() - started, 1)
        print(f"lever {name}: {results[name]}", flush=True)
    earlier = json.loads(out.read_text())["levers"] if out.exists() and args.only else {}
    out.write_text(json.dumps({"seed": seed, "split": "validation", "levers": earlier | results}, indent=2) + "\n")
    return results


ECPM_BID_SIGMA = 0.5  # synthetic bids for the eCPM recall: log-normal, a ~2.7x spread between +-1 sigma


def two_stage_recall(settings: Settings, checkpoint: Path, paths: dict[str, Path], test_from) -> dict:
    """Stage 1 against exhaustive cross-encoder scoring over every active ad, for a seeded sample of the users
    rerank ranks on the first test day: recall@10 of the two-stage top 10 at each K, and stage 1's
    within-user Spearman correlation with the served log-odds."""
    distill_two_tower(settings, checkpoint, paths["train"])
    ranked = settings.model_copy(update={"ranking": settings.ranking.model_copy(update={"run_date": test_from.date()})})
    inputs = build_ranking_inputs(ranked)
    users = inputs.users.sample(min(TWO_STAGE_USERS, inputs.users.height), seed=settings.training.seed)
    ads = inputs.ads
    cross_encoder, tokenizer = load_cross_encoder(str(checkpoint), pick_device())
    model = RankingModel(
        cross_encoder,
        tokenizer,
        load_calibration(checkpoint),
        load_two_tower(checkpoint),
        settings.model.max_seq_length,
        settings.training.eval_batch_size,
    )
    stage1 = stage1_scores(model, users, project_users(model, users), prepare_stage1(model, ads, ScoringStats()))
    repeated = users.select(pl.all().repeat_by(ads.height).explode())
    ad_texts = np.tile(ads["ad_text"].to_numpy(), users.height)
    logits = predict_logits(
        cross_encoder, tokenizer, repeated["user_text"], ad_texts, model.max_length, model.batch_size
    )
    ad_ids = np.tile(ads["ad_id"].to_numpy(), users.height).tolist()
    exhaustive = model.calibration.log_odds(logits, ad_ids, user_history(repeated)).reshape(users.height, ads.height)
    best10 = [set(np.argsort(-row, kind="stable")[:10]) for row in exhaustive]
    recall = {}
    for k in TWO_STAGE_KS:
        candidates = np.argsort(-stage1, axis=1, kind="stable")[:, :k]
        hits = [
            len(best & set(cands[np.argsort(-row[cands], kind="stable")[:10]]))
            for best, cands, row in zip(best10, candidates, exhaustive, strict=True)
        ]
        recall[str(k)] = float(np.mean(hits) / 10)
    spearman = [spearmanr(a, b).statistic for a, b in zip(stage1, exhaustive, strict=True)]
    # ranking.objective = ecpm: MovieLens has no bids, so each ad gets a seeded log-normal one; the served
    # order is sigmoid(log-odds) x bid, stage 1's is log sigmoid(stage-1 log-odds) + log bid (tasks/score.py)
    log_bids = np.random.default_rng(settings.training.seed).normal(0.0, ECPM_BID_SIGMA, ads.height)
    ecpm = -np.logaddexp(0.0, -exhaustive) + log_bids
    best10_ecpm = [set(np.argsort(-row, kind="stable")[:10]) for row in ecpm]
    candidates = np.argsort(-(-np.logaddexp(0.0, -stage1) + log_bids), axis=1, kind="stable")[
        :, : settings.ranking.candidates_k
    ]
    hits = [
        len(best & set(cands[np.argsort(-row[cands], kind="stable")[:10]]))
        for best, cands, row in zip(best10_ecpm, candidates, ecpm, strict=True)
    ]
    return {
        "users": users.height,
        "ads": ads.height,
        "run_date": str(test_from.date()),
        "recall_at_10": recall,
        "recall_at_10_ecpm": float(np.mean(hits) / 10),
        "default_k": settings.ranking.candidates_k,
        "within_user_spearman": float(np.mean(spearman)),
    }


def summarize(runs: list[dict]) -> tuple[dict, dict, dict]:
    """Means over seeds per model and slice; the best peer and the paired interval per metric and slice."""
    models = list(dict.fromkeys(m for run in runs for m in run["predictions"]))
    means: dict = {}
    for model in models:
        rows = pl.concat([run["table"].filter(pl.col("model") == model) for run in runs if model in run["predictions"]])
        means[model] = {
            row["slice"]: {k: row[k] for k in (*REPORTED, "pairs", "clicks")}
            for row in rows.group_by("slice").agg(pl.all().exclude("model").mean()).iter_rows(named=True)
        }
    best, intervals = {}, {}
    for metric in protocol.INTERVAL_METRICS:
        best[metric], intervals[metric] = {}, {}
        for slice_name in SLICES:
            peer = protocol.best_peer(means, PEERS, metric, slice_name)
            best[metric][slice_name] = peer
            intervals[metric][slice_name] = list(
                protocol.paired_bootstrap(runs, DEFAULT, peer, slice_name, metric, BOOTSTRAP_REPLICATES, seed=0)
            )
    return means, best, intervals


def reliability_diagram(runs: list[dict], path: Path) -> None:
    """One panel per model: mean pCTR against observed CTR in 15 equal-mass bins, all seeds' test pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(runs[0]["predictions"])
    fig, axes = plt.subplots(2, (len(models) + 1) // 2, figsize=(4 * ((len(models) + 1) // 2), 8), squeeze=False)
    for ax, model in zip(axes.flat, models, strict=False):
        with_model = [run for run in runs if model in run["predictions"]]
        pctr = np.concatenate([run["predictions"][model] for run in with_model])
        labels = np.concatenate([run["test"]["is_clicked"].cast(pl.Int8).to_numpy() for run in with_model])
        bins = np.array_split(np.argsort(pctr, kind="stable"), 15)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.plot([pctr[b].mean() for b in bins], [labels[b].mean() for b in bins], "o-", ms=3)
        ax.set(title=model, xlabel="mean pCTR", ylabel="observed CTR", xlim=(0, 1), ylim=(0, 1))
    for ax in list(axes.flat)[len(models) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    work = args.work.resolve()
    if args.data:
        logs, data_checksum = work / f"{args.name}-logs", checksum(args.data)
        convert_movielens(args.data, logs)
    else:
        logs, data_checksum = args.logs.resolve(), "n/a (--logs)"
    if args.levers:
        return run_levers(args, logs)
    if args.two_stage_only:
        settings, _, paths, held_out = prepare_seed(args, logs, args.seeds[0], **CHOSEN)
        checkpoint = work / args.name / f"tuned-{args.seeds[0]}"
        result = two_stage_recall(settings, checkpoint, paths, held_out["test_from"])
        print(json.dumps(result, indent=2))
        return result
    timings: dict[str, float] = {}
    runs = []
    for i, seed in enumerate(args.seeds):
        saved = work / args.name / f"run-{seed}.pkl"  # scratch: a crash in the summary keeps the trained seeds
        if args.resume and saved.exists():
            runs.append(pickle.loads(saved.read_bytes()))
            continue
        runs.append(run_seed(args, logs, seed, i == 0, timings))
        saved.write_bytes(pickle.dumps(runs[-1]))
    means, best, intervals = summarize(runs)
    settings = bench_settings(args, logs, args.seeds[0], **CHOSEN)
    stem = f"quality-{args.name}" + ("-quick" if args.quick else "")
    result = {
        "models": means,
        "default_model": DEFAULT,
        "peers": PEERS,
        "best_peer": best,
        "intervals": intervals,
        "features_as_of": settings.data.features_as_of,
        "seeds": list(args.seeds),
        "kept_step": {m: [run["kept_step"].get(m) for run in runs] for m in runs[0]["kept_step"]},
        "validation_at_kept_step": {m: runs[0]["validation"][m] for m in runs[0]["validation"]},
        "two_stage": runs[0]["two_stage"],
        "two_stage_recall_at_10": runs[0]["two_stage"]["recall_at_10"][str(settings.ranking.candidates_k)],
        "per_seed": {run["seed"]: run["table"].to_dicts() for run in runs},
        "mode": "quick" if args.quick else "full",
        "data": args.name,
        "data_checksum_sha256": data_checksum,
        "pairs": runs[0]["pairs"],
        "cold_items": runs[0]["cold_items"],
        "hardware": f"{platform.machine()}, {torch.get_num_threads()} threads, "
        + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"),
        "config": settings.model_dump(mode="json", include={"data", "model", "training"}),
        "chosen_levers": CHOSEN,
        "seconds": timings | {"total": round(time.monotonic() - started, 1)},
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    image = args.out_dir / "benchmarks" / f"{stem}-reliability.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    reliability_diagram(runs, image)
    write_outputs(args.out_dir, stem, result)
    log_to_mlflow(settings, result, image)
    return result


def markdown_table(result: dict) -> str:
    columns = ("gauc", "auc", "ndcg@10", "logloss", "ece_equal_mass", "calibration_ratio")
    lines = [
        "| model | slice | " + " | ".join(columns) + " | kept step |",
        "|---|---|" + "---|" * (len(columns) + 1),
    ]
    for model, slices in result["models"].items():
        steps = result["kept_step"].get(model)
        kept = ", ".join("—" if s is None else str(s) for s in steps) if steps else ""
        for slice_name in SLICES:
            values = " | ".join(f"{slices[slice_name][c]:.4f}" for c in columns)
            lines.append(f"| {model} | {slice_name} | {values} | {kept if slice_name == 'overall' else ''} |")
    intervals = []
    for metric, by_slice in result["intervals"].items():
        for slice_name, (low, high) in by_slice.items():
            peer = result["best_peer"][metric][slice_name]
            ours, theirs = (result["models"][m][slice_name][metric] for m in (DEFAULT, peer))
            if metric == "calibration_ratio":
                ours, theirs = abs(ours - 1), abs(theirs - 1)
            intervals.append(f"| {metric} | {slice_name} | {peer} | {ours - theirs:+.4f} | [{low:+.4f}, {high:+.4f}] |")
    return (
        "\n".join(lines)
        + "\n\nDefault minus the best peer (mean over seeds; 95% paired user bootstrap; calibration ratio: "
        "difference of |ratio − 1|):\n\n"
        "| metric | slice | best peer | difference | 95% interval |\n|---|---|---|---|---|\n"
        + "\n".join(intervals)
        + "\n"
    )


def write_outputs(out_dir: Path, stem: str, result: dict) -> None:
    (out_dir / "benchmarks" / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    two_stage = result["two_stage"]
    section = (
        f"Command: `{result['command']}`  \n"
        f"Mode: {result['mode']} · features as of {result['features_as_of']} · seeds {result['seeds']} · "
        f"data sha256 `{result['data_checksum_sha256'][:16]}…` · {result['hardware']} · "
        f"wall time {result['seconds']['total'] / 60:.1f} min · pairs (first seed) {result['pairs']}\n\n"
        + markdown_table(result)
        + f"\nTwo-stage ranking ({two_stage['users']} users × {two_stage['ads']} ads, {two_stage['run_date']}): "
        f"recall@10 against exhaustive scoring {two_stage['recall_at_10']} (K: recall), within-user Spearman of "
        f"stage 1 with the served log-odds {two_stage['within_user_spearman']:.3f}.\n"
    )
    doc = out_dir / "benchmarks.md"
    start, end = f"<!-- {stem}:start -->", f"<!-- {stem}:end -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{start}\n{section}{end}"
    text = (
        re.sub(f"{re.escape(start)}.*?{re.escape(end)}", lambda _: block, text, flags=re.S)
        if start in text
        else text.rstrip() + f"\n\n## Quality: {result['data']} ({result['mode']})\n\n{block}\n"
    )
    doc.write_text(text)


def log_to_mlflow(settings: Settings, result: dict, image: Path) -> None:
    experiment_id = configure_tracking(settings)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"quality-{result['data']}-{result['mode']}"):
        mlflow.log_params(
            {
                "mode": result["mode"],
                "seeds": result["seeds"],
                "features_as_of": result["features_as_of"],
                "data_checksum": result["data_checksum_sha256"],
            }
        )
        for model, slices in result["models"].items():
            for slice_name, values in slices.items():
                mlflow.log_metrics(
                    {f"{model}.{slice_name}.{k}".replace("@", "_at_"): float(v) for k, v in values.items() if v == v}
                )  # skip NaN
        mlflow.log_dict(result, "result.json")
        mlflow.log_artifact(str(image))


if __name__ == "__main__":
    outcome = run(parse_args())
    print(json.dumps(outcome.get("models", outcome), indent=1, default=str))
