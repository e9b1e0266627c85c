"""Ranking quality on real data: adrank's fine-tuned cross-encoder against ID-based CTR models.

    python benchmarks/quality.py --data ../shared/datasets/ml-100k --quick   # < 20 min on 2 CPU cores
    python benchmarks/quality.py --data ../shared/datasets/ml-100k           # full: meant for a GPU
    python benchmarks/quality.py --logs /path/to/contract/logs --name mydata  # any data in the log contract

Pairs come from adrank's own build_pairs (time split: last 10% test, 10% before validation) and the
cross-encoders from adrank's own fine_tune with its default config. A seeded 10% of items is held out
of training and validation: their test impressions are the cold-start slice.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import baselines  # noqa: E402
from benchmarks.movielens import checksum, convert_movielens  # noqa: E402
from tasks.config import Settings, load_settings  # noqa: E402
from tasks.evaluate import evaluation_table, popularity_ctr, score_checkpoint, to_markdown  # noqa: E402
from tasks.logs import open_logs  # noqa: E402
from tasks.model import load_cross_encoder, pick_device, predict_logits  # noqa: E402
from tasks.pairs import build_pairs, user_history  # noqa: E402
from tasks.registry import configure_tracking  # noqa: E402
from tasks.train import calibrate, fine_tune  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COLD_ITEM_SHARE = 0.10
# --quick: what fits in < 20 minutes on 2 CPU cores at ~22 training pairs/s. The cross-encoders train on a
# seeded random sample of the train split; the ID baselines (seconds on a CPU) fit all of it, as deployed.
QUICK = {"train_pairs": 14000, "valid_pairs": 1500, "test_user_share": 0.4, "epochs": 1}
DEFAULT_MODEL, HEAD_ONLY = "fine_tuned", "base_trained_head"
# the same fine-tuned weights with a smaller output layer (model.calibration), to show what each prior adds
ABLATIONS = {"fine_tuned_text_only": "platt", "fine_tuned_no_user_prior": "platt+ad_prior"}
ID_BASELINES = ["popularity", "logistic_regression", "lightgbm", "lightgbm_user_history", "deepfm"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="MovieLens-100K folder (converted to the log contract)")
    source.add_argument("--logs", type=Path, help="a data set already in adrank's log contract")
    parser.add_argument("--name", default="ml100k", help="data set name in output file names")
    parser.add_argument("--quick", action="store_true", help="subsampled CPU mode (see QUICK)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", type=Path, default=Path("adrank_home/benchmarks"), help="scratch folder")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs", help="where benchmarks.md lives")
    return parser.parse_args()


def split_pairs(settings: Settings, seed: int, quick: bool) -> dict[str, pl.DataFrame]:
    """adrank's time split, minus the held-out cold items in train/valid, subsampled in quick mode."""
    built = build_pairs(settings)
    splits = {name: pl.read_parquet(path) for name, path in built.paths.items()}
    items = np.sort(pl.concat([s["ad_id"] for s in splits.values()]).unique().to_numpy())
    rng = np.random.default_rng(seed)
    cold = rng.choice(items, size=max(1, round(COLD_ITEM_SHARE * len(items))), replace=False).tolist()
    for name in ("train", "valid"):
        splits[name] = splits[name].filter(~pl.col("ad_id").is_in(cold))
    splits["test"] = splits["test"].with_columns(pl.col("ad_id").is_in(cold).alias("is_cold_start"))
    if quick:
        splits["valid"] = splits["valid"].sample(min(QUICK["valid_pairs"], splits["valid"].height), seed=seed)
        users = splits["test"]["user_id"].unique().sort()
        kept = users.sample(fraction=QUICK["test_user_share"], seed=seed)
        splits["test"] = splits["test"].filter(pl.col("user_id").is_in(kept.implode()))
    return splits


def cross_encoder(settings: Settings, splits: dict[str, Path], out_dir: Path, test: pl.DataFrame) -> np.ndarray:
    """adrank's fine_tune, then its calibrated predictions on the test pairs."""
    result = fine_tune(settings, splits["train"], splits["valid"], out_dir)
    return score_checkpoint(settings, result.checkpoint, test)


def ablations(settings: Settings, checkpoint: Path, train: pl.DataFrame, valid: pl.DataFrame, test: pl.DataFrame):
    """The fine-tuned weights with each output layer in ABLATIONS, fitted on validation as fine_tune does."""
    model, tokenizer = load_cross_encoder(str(checkpoint), pick_device())
    args = settings.model.max_seq_length, settings.training.eval_batch_size
    valid_logits = predict_logits(model, tokenizer, valid["user_text"], valid["ad_text"], *args)
    test_logits = predict_logits(model, tokenizer, test["user_text"], test["ad_text"], *args)
    predictions = {}
    for name, method in ABLATIONS.items():
        config = settings.model_copy(update={"model": settings.model.model_copy(update={"calibration": method})})
        layer = calibrate(config, train, valid, valid_logits)
        predictions[name] = layer.apply(test_logits, test["ad_id"].to_list(), user_history(test))
    return predictions


def run(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    work = args.work.resolve()
    if args.data:
        logs, data_checksum = work / f"{args.name}-logs", checksum(args.data)
        convert_movielens(args.data, logs)
    else:
        logs, data_checksum = args.logs.resolve(), "n/a (--logs)"
    overrides = {
        "home": str(work / args.name),
        "data": {"logs": str(logs)},
        "tracking": {"experiment": "adrank-benchmarks"},
        "training": {"seed": args.seed},
    }
    if args.quick:  # the cross-encoders fine-tune on a sample; the ad prior and the ID baselines see all of train
        overrides["training"] |= {"epochs": QUICK["epochs"], "sample_pairs": QUICK["train_pairs"]}
    settings = load_settings(overrides)

    # pairs and splits
    splits = split_pairs(settings, args.seed, args.quick)
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    paths = {}
    for name, frame in (("train", train), ("valid", valid), ("test", test)):
        paths[name] = settings.pairs_dir / f"bench-{name}.parquet"
        frame.write_parquet(paths[name])
    labels = train["is_clicked"].cast(pl.Int8).to_numpy()
    timings: dict[str, float] = {}

    def timed(name: str, fn, *fn_args) -> np.ndarray:
        start = time.monotonic()
        out = fn(*fn_args)
        timings[name] = round(time.monotonic() - start, 1)
        print(f"{name}: {timings[name]} s", flush=True)
        return out

    # ID baselines on the same pairs, with the profile and ad columns as adrank stages them (ids as text)
    staged = open_logs(str(logs), settings.data)
    users, ads = staged.table("stg_users").pl(), staged.table("stg_ads").pl()
    features = {name: baselines.side_features(splits[name], users, ads) for name in ("train", "valid", "test")}
    predictions = {
        "popularity": timed("popularity", popularity_ctr, train, test),
        "logistic_regression": timed(
            "logistic_regression", baselines.logistic_regression, features["train"], labels, features["test"], args.seed
        ),
    }
    # early-stopped on validation: LightGBM, LightGBM also given the point-in-time user click counts that
    # adrank's user prior uses, and FuxiCTR's DeepFM
    valid_labels = valid["is_clicked"].cast(pl.Int8).to_numpy()
    with_history = {name: baselines.with_user_history(frame, splits[name]) for name, frame in features.items()}
    for name, fit, frames in (
        ("lightgbm", baselines.lightgbm, features),
        ("lightgbm_user_history", baselines.lightgbm, with_history),
        ("deepfm", baselines.deepfm, features),
    ):
        fit_args = frames["train"], labels, frames["valid"], valid_labels, frames["test"], args.seed
        predictions[name] = timed(name, fit, *fit_args)
    # the base model with only a trained head, then adrank's default: full fine-tuning
    head_only = settings.model_copy(update={"training": settings.training.model_copy(update={"trainable_layers": 0})})
    predictions[HEAD_ONLY] = timed(HEAD_ONLY, cross_encoder, head_only, paths, work / args.name / "head-only", test)
    predictions[DEFAULT_MODEL] = timed(DEFAULT_MODEL, cross_encoder, settings, paths, work / args.name / "tuned", test)
    predictions |= timed("ablations", ablations, settings, work / args.name / "tuned", train, valid, test)

    table = evaluation_table(test, predictions)
    result = {
        "models": {
            model: {
                row["slice"]: {
                    k: row[k] for k in ("auc", "logloss", "ece", "ndcg@10", "hit_rate@10", "pairs", "clicks")
                }
                for row in table.filter(pl.col("model") == model).iter_rows(named=True)
            }
            for model in predictions
        },
        "default_model": DEFAULT_MODEL,
        "id_baselines": ID_BASELINES,
        "mode": "quick" if args.quick else "full",
        "data": args.name,
        "data_checksum_sha256": data_checksum,
        "seed": args.seed,
        "pairs": {name: frame.height for name, frame in splits.items()},
        "cold_items": int(COLD_ITEM_SHARE * 100),
        "hardware": f"{platform.machine()}, {torch.get_num_threads()} threads, "
        + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"),
        "config": settings.model_dump(mode="json", include={"data", "model", "training"}),
        "seconds": timings | {"total": round(time.monotonic() - started, 1)},
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    write_outputs(args, result, table)
    log_to_mlflow(settings, result, table)
    return result


def write_outputs(args: argparse.Namespace, result: dict, table: pl.DataFrame) -> None:
    stem = f"quality-{args.name}" + ("-quick" if args.quick else "")
    (args.out_dir / "benchmarks").mkdir(parents=True, exist_ok=True)
    (args.out_dir / "benchmarks" / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    section = (
        f"Command: `{result['command']}`  \n"
        f"Mode: {result['mode']} · data sha256 `{result['data_checksum_sha256'][:16]}…` · seed {result['seed']} · "
        f"{result['hardware']} · wall time {result['seconds']['total'] / 60:.1f} min · pairs {result['pairs']}\n\n"
        + to_markdown(table.drop("mean_pctr", "std_pctr"))
        + "\n"
    )
    doc = args.out_dir / "benchmarks.md"
    start, end = f"<!-- {stem}:start -->", f"<!-- {stem}:end -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{start}\n{section}{end}"
    text = (
        re.sub(f"{re.escape(start)}.*?{re.escape(end)}", lambda _: block, text, flags=re.S)
        if start in text
        else text.rstrip() + f"\n\n## Quality: {args.name} ({result['mode']})\n\n{block}\n"
    )
    doc.write_text(text)


def log_to_mlflow(settings: Settings, result: dict, table: pl.DataFrame) -> None:
    experiment_id = configure_tracking(settings)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"quality-{result['data']}-{result['mode']}"):
        mlflow.log_params(
            {"mode": result["mode"], "seed": result["seed"], "data_checksum": result["data_checksum_sha256"]}
        )
        for model, slices in result["models"].items():
            for slice_name, values in slices.items():
                mlflow.log_metrics(
                    {f"{model}.{slice_name}.{k}".replace("@", "_at_"): float(v) for k, v in values.items() if v == v}
                )  # skip NaN
        mlflow.log_table(table.to_pandas(), "quality.json")
        mlflow.log_dict(result, "result.json")


if __name__ == "__main__":
    outcome = run(parse_args())
    print(json.dumps({m: outcome["models"][m] for m in outcome["models"]}, indent=1))
