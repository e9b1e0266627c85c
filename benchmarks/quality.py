"""Ranking quality on real data, as the nightly job serves it: adrank's default against content-aware peers.

    python benchmarks/quality.py --data ../shared/datasets/ml-100k --quick   # ~35 min a seed on 2 idle CPU cores
    python benchmarks/quality.py --data ../shared/datasets/ml-100k           # full: meant for a GPU
    python benchmarks/quality.py --logs /path/to/contract/logs --name mydata  # any data in the log contract
    python benchmarks/quality.py --sample --quick                             # the embedded sample market

What is measured is adrank's default config (tasks/config.py), with --quick's scale overrides only (QUICK),
at the recorded commit. Protocol (benchmarks/protocol.py): for each seed, a seeded 10% of the items is removed
from the logs before the test window, then adrank's own build_pairs builds every feature as of the start of
each impression's day (what rerank knows: user and ad counts, histories), split at the full logs' time
cutoffs (last 10% test, 10% before validation). Slices (tasks/evaluate.py): ranked_users (the users rerank
ranks that day: the headline), cold_start (ads never shown before the day), new_ads (no train or validation
pair), users_without_history. Every model and lever is chosen on validation; the test split is scored once
per run. Peers get the same information at the same moment (benchmarks/baselines.py::content_features;
the text-aware LightGBM also the pair's texts: text_features).
Intervals: paired user-level bootstrap, averaged over seeds (tasks/intervals.py).
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import baselines, protocol  # noqa: E402
from benchmarks.docs_blocks import command_line, hardware, write_block  # noqa: E402
from tasks.config import Settings, flat_params, load_settings  # noqa: E402
from tasks.evaluate import (  # noqa: E402
    SLICE_COLUMNS,
    SLICES,
    Evaluation,
    evaluation_table,
    popularity_ctr,
    slice_masks,
)
from tasks.gates import promotion_gates  # noqa: E402
from tasks.intervals import INTERVAL_METRICS, Scored, paired_interval  # noqa: E402
from tasks.logs import open_logs  # noqa: E402
from tasks.metrics import expected_calibration_error_equal_mass, metrics, ranking_lists  # noqa: E402
from tasks.model import load_cross_encoder, pick_device, predict_logits  # noqa: E402
from tasks.output_layer import Calibration, PairPriors, load_calibration  # noqa: E402
from tasks.pairs import read_ad_texts, split_fractions  # noqa: E402
from tasks.registry import configure_tracking, git_commit  # noqa: E402
from tasks.semantic_match import saved_match_encoder, with_served_match  # noqa: E402
from tasks.sql_files import materialize  # noqa: E402
from tasks.train import calibrate, cross_fitted_pctr, fine_tune  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEEDS = (42, 43, 44)  # training seed and cold-item draw
# --quick: the cross-encoder fine-tunes 1 epoch on a seeded sample of the train split and compares its steps on a
# seeded sample of validation of selection_pairs pairs and training.min_valid_clicks clicks; its output layer, and
# every peer, get all of validation; peers fit all of train; every model scores the full test split.
QUICK = {"train_pairs": 10000, "selection_pairs": 2000, "epochs": 1, "eval_every_steps": 200}
DEFAULT = "fine_tuned"
# the default's output layer without priors (the logit and the semantic match), without any text, and without
# the fine-tuned logit (step 0: the priors and the semantic match, its encoder tuned on the clicks)
TEXT_ONLY, PRIORS_ONLY, ZERO_SHOT = "fine_tuned_text_only", "priors_only", "priors_and_match"
PEERS = ["popularity", "lightgbm", "lightgbm_text", "deepfm"]
HEADLINE = "ranked_users"  # the users the nightly rerank ranks
# the reported runs whose headline README quotes -> README's block
HEADLINE_RUNS = {"quality-ml100k-quick": "quality-headline", "quality-sample-quick": "quality-sample-headline"}
# levers (config overrides) tried with --levers on the first seed against the default, judged on validation only
HISTORY_WITH_GENRES = {"history_length": 5, "history_item_template": "{title} {description}"}
LEVERS = {
    "pooling_mean": {"model": {"pooling": "mean"}},
    "history_5_with_genres": {"data": HISTORY_WITH_GENRES},
    "user_prior_offset": {"training": {"user_prior_offset": True}},
    "ranking_loss": {"training": {"ranking_loss_weight": 1.0}},
    "prior_offsets": {"training": {"user_prior_offset": True, "ad_prior_offset": True}},
    "no_semantic_match": {"model": {"calibration": "platt+ad_prior+user_prior"}},
    "top_2_layers_trained": {"training": {"trainable_layers": 2}},
    "match_offset": {"training": {"match_offset": True}},
    "zero_shot_match": {"training": {"match_epochs": 0}},
    "cross_encoder_from_match": {"training": {"cross_encoder_from_match": True}},
    "no_cross_encoder": {"training": {"epochs": 0}},  # the priors and the match alone: no cross-encoder run
    "tuned_match_unguarded": {"training": {"match_guard": False}},
    "new_user_weights": {"model": {"new_user_weights": True}},
    "affinity": {
        "data": {"shown_history_length": 100},
        "model": {"calibration": "platt+match+affinity+ad_prior+user_prior"},
    },
}
LEVER_METRICS = ("logloss", "auc", "gauc")
BOOTSTRAP_REPLICATES = 1000
ECE_NOISE_DRAWS = 200  # label draws from the model's own pCTR: the ECE a perfectly calibrated model would show
REPORTED = ("gauc", "auc", "ndcg@10", "logloss", "ece_equal_mass", "calibration_ratio", "ece", "hit_rate@10")
CONTRIBUTION_METRICS = ("gauc", "auc", "ndcg@10")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="MovieLens-100K folder (converted to the log contract)")
    source.add_argument("--logs", type=Path, help="a data set already in adrank's log contract")
    source.add_argument(
        "--sample", action="store_true", help="the embedded sample market (adrank sample-data's defaults, seed 7)"
    )
    parser.add_argument(
        "--name", help="data set name in output file names (default: ml100k, sample, or the --logs folder's name)"
    )
    parser.add_argument("--quick", action="store_true", help="subsampled CPU mode (see QUICK)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--levers", action="store_true", help="only compare LEVERS on validation (first seed)")
    parser.add_argument("--only", nargs="+", help="with --levers: just these (the default is fine_tuned)")
    parser.add_argument("--resume", action="store_true", help="reuse seeds scored in --work by the same commit")
    parser.add_argument("--work", type=Path, default=Path("adrank_home/benchmarks"), help="scratch folder")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs", help="where benchmarks.md lives")
    args = parser.parse_args()
    args.name = args.name or ("ml100k" if args.data else "sample" if args.sample else args.logs.resolve().name)
    return args


def quick_overrides(args: argparse.Namespace) -> dict:
    """The config overrides --quick makes (scale only); nothing else departs from adrank's defaults."""
    if not args.quick:
        return {}
    training = {
        "epochs": QUICK["epochs"],
        "sample_pairs": QUICK["train_pairs"],
        "eval_every_steps": QUICK["eval_every_steps"],
        "selection_pairs": QUICK["selection_pairs"],
    }
    return {"training": training}


def bench_settings(args: argparse.Namespace, logs: Path, seed: int, **sections) -> Settings:
    overrides = {
        "home": str(args.work.resolve() / args.name),
        "data": {"logs": str(logs)},
        "tracking": {"experiment": "adrank-benchmarks"},
        "training": {"seed": seed},
        "stage1": {"seed": seed},
    }
    for section, values in (quick_overrides(args) | {}).items():
        overrides[section] = overrides.get(section, {}) | values
    for section, values in sections.items():
        overrides[section] = overrides.get(section, {}) | values
    return load_settings(overrides)


def departures_from_defaults(settings: Settings) -> dict[str, str]:
    """Every config value (data, model, training, ranking, promotion) that is not adrank's default."""
    defaults, ours = flat_params(load_settings()), flat_params(settings)
    sections = ("data.", "model.", "training.", "ranking.", "promotion.")
    return {key: value for key, value in ours.items() if key.startswith(sections) and value != defaults.get(key)}


def cutoffs(settings: Settings):
    """valid_from, test_from of the full logs (sql/int_split_cutoffs.sql)."""
    con = open_logs(settings.data.logs, settings.data)
    materialize(con, "int_split_cutoffs", split_fractions(settings.data))
    return con.execute("select valid_from, test_from from int_split_cutoffs").fetchone()


def fine_tuned(
    settings: Settings,
    paths: dict[str, Path],
    out_dir: Path,
    splits: dict[str, pl.DataFrame],
    scored: tuple[str, ...] = ("valid", "test"),
) -> dict:
    """adrank's fine_tune; its logits on the scored splits and those splits with its semantic match (if it
    has one), its output layer as saved (what ships: without the logit when no trained step beat step 0),
    the kept step and the selection decision's intervals."""
    result = fine_tune(settings, paths["train"], paths["valid"], out_dir)
    device, args = pick_device(), (settings.model.max_seq_length, settings.training.eval_batch_size)
    model, tokenizer = load_cross_encoder(str(out_dir), device)
    match_encoder = saved_match_encoder(out_dir, device, *args)
    layer = load_calibration(out_dir)
    ads = read_ad_texts(settings.pairs_dir) if layer.uses_affinity else None  # the affinity term's shown ads
    bandwidth = layer.affinity_bandwidth if layer.uses_affinity else None
    logits = {
        name: result.valid_logits  # computed by fine_tune (a trained step kept)
        if name == "valid" and result.valid_logits is not None
        else predict_logits(model, tokenizer, splits[name]["user_text"], splits[name]["ad_text"], *args)
        for name in scored
    }
    kept = next(row for row in result.history if row["step"] == result.best_step)
    return {
        "logits": logits,
        "pairs": {name: with_served_match(splits[name], match_encoder, bandwidth, ads) for name in scored},
        "layer": layer,
        "kept_step": result.best_step,
        "valid": kept,
        "text_gain": {metric: gain.as_dict() for metric, gain in result.text_gain.items()},
        "best_trained_step": result.best_trained_step,
        "match_tuned": result.match_tuned,  # the served match's encoder: tuned, or zero-shot (the guard)
        "match_gain": {metric: gain.as_dict() for metric, gain in result.match_gain.items()},
        "checkpoint": out_dir,
    }


def output_layer(settings: Settings, method: str, splits: dict, valid_logits: np.ndarray | None) -> Calibration:
    config = settings.model_copy(update={"model": settings.model.model_copy(update={"calibration": method})})
    return calibrate(config, splits["train"], splits["valid"], valid_logits)


def layer_terms(settings: Settings, keep: tuple[str, ...]) -> str:
    """The default's model.calibration with only the terms in keep (platt is always kept)."""
    return "+".join(t for t in settings.model.terms if t == "platt" or t in keep)


def served(layer: Calibration, pairs: pl.DataFrame, logits: np.ndarray | None) -> np.ndarray:
    return layer.apply(np.zeros(pairs.height) if logits is None else logits, PairPriors.of(pairs))


def prepare_seed(args: argparse.Namespace, logs: Path, seed: int, **overrides) -> tuple:
    """Hold out the seed's cold items, build pairs as of day start and split them: settings, splits, paths."""
    settings = bench_settings(args, logs, seed)
    valid_from, test_from = cutoffs(settings)
    seed_logs = args.work.resolve() / f"{args.name}-logs-seed{seed}"
    cold_items = protocol.hold_out_items(logs, seed_logs, seed, test_from)
    settings = bench_settings(args, seed_logs, seed, **overrides)
    splits = protocol.time_split_pairs(settings, valid_from, test_from)
    paths = {}
    for name, frame in splits.items():
        paths[name] = settings.pairs_dir / f"bench-{name}.parquet"
        frame.write_parquet(paths[name])
    return settings, splits, paths, {"test_from": test_from, "cold_items": cold_items, "logs": seed_logs}


def run_seed(args: argparse.Namespace, logs: Path, seed: int, timings: dict) -> dict:
    """One seed: hold out items, build pairs as of day start, fit every model, score the test split once."""
    settings, splits, paths, held_out = prepare_seed(args, logs, seed)
    seed_logs, cold_items = held_out["logs"], held_out["cold_items"]
    train, test = splits["train"], splits["test"]

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
    shown = settings.data.shown_history_length > 0  # peers see the past impressions adrank reads
    features = {name: baselines.content_features(splits[name], users, ads, shown) for name in splits}
    labels = {name: frame["is_clicked"].cast(pl.Int8).to_numpy() for name, frame in splits.items()}
    predictions = {"popularity": popularity_ctr(train, test)}
    for name, fit in (("lightgbm", baselines.lightgbm), ("deepfm", baselines.deepfm)):
        fit_args = features["train"], labels["train"], features["valid"], labels["valid"], features["test"], seed
        predictions[name] = timed(name, fit, *fit_args)
    texts = baselines.text_features(splits, seed)
    with_text = {name: pd.concat([features[name], texts[name]], axis=1) for name in splits}
    fit_args = with_text["train"], labels["train"], with_text["valid"], labels["valid"], with_text["test"], seed
    predictions["lightgbm_text"] = timed("lightgbm_text", baselines.lightgbm, *fit_args)

    # adrank's default as it ships (its saved output layer); that layer without priors (text only) and
    # without text (priors only)
    default = timed(DEFAULT, fine_tuned, settings, paths, args.work.resolve() / args.name / f"tuned-{seed}", splits)
    scored = splits | default["pairs"]  # valid and test with the semantic match (if the default has one)
    test = scored["test"]
    kept_logits = None if default["kept_step"] == 0 else default["logits"]["test"]
    predictions[DEFAULT] = served(default["layer"], test, kept_logits)
    text_only = output_layer(settings, layer_terms(settings, ("match",)), scored, default["logits"]["valid"])
    predictions[TEXT_ONLY] = served(text_only, test, default["logits"]["test"])
    priors = output_layer(settings, layer_terms(settings, ("ad_prior", "user_prior")), scored, None)
    predictions[PRIORS_ONLY] = served(priors, test, None)
    if "match" in settings.model.terms:
        predictions[ZERO_SHOT] = served(output_layer(settings, settings.model.calibration, scored, None), test, None)

    table = evaluation_table(test, predictions)
    return {
        "seed": seed,
        "commit": git_commit(),
        "dirty": git_dirty(),  # uncommitted edits: the commit does not name the code, never resumed
        "test": test.select(SLICE_COLUMNS),
        "predictions": predictions,
        "table": table,
        "gates": first_champion_gates(settings, test, table, predictions, default["kept_step"]),
        "kept_step": {DEFAULT: default["kept_step"]},
        "validation": {DEFAULT: default["valid"]},
        "selection": {key: default[key] for key in ("best_trained_step", "text_gain", "match_tuned", "match_gain")},
        "cold_fit": default["layer"].cold_fit,
        "valid_clicks": int(labels["valid"].sum()),
        "cold_items": len(cold_items),
        "pairs": {name: frame.height for name, frame in splits.items()},
    }


def first_champion_gates(
    settings: Settings, test: pl.DataFrame, table: pl.DataFrame, predictions: dict, kept_step: int
) -> list[dict]:
    """The promotion gates (tasks/gates.py) the default would face as a first champion on this test split
    (the smoke gate, which loads a registered version, is not run here)."""
    scored = {name: predictions[name] for name in (DEFAULT, "popularity")}
    evaluation = Evaluation(table.filter(pl.col("model").is_in(list(scored))), test, scored, np.zeros(1))
    gates = promotion_gates(evaluation, kept_step, None, settings.promotion)
    return [asdict(gate) for gate in gates if gate.name != "smoke"]


def run_levers(args: argparse.Namespace, logs: Path) -> dict:
    """The default and each lever on the first seed, judged on validation only (the test split is not read):
    the served score at the kept step, its output layer cross-fitted on validation (a lever that adds weights
    to the layer gains nothing from fitting them on the pairs it is judged on), with paired intervals of each
    lever minus the default on the same validation pairs, overall and on the users rerank ranks."""
    seed, results = args.seeds[0], {}
    out = args.out_dir / "benchmarks" / f"levers-{args.name}{'-quick' if args.quick else ''}.json"
    work = args.work.resolve() / args.name
    for name, overrides in {DEFAULT: {}, **LEVERS}.items():
        if args.only and name not in args.only:
            continue
        started = time.monotonic()
        settings, splits, paths, _ = prepare_seed(args, logs, seed, **overrides)
        tuned = fine_tuned(settings, paths, work / f"lever-{name}", splits, scored=("valid",))
        valid = tuned["pairs"]["valid"]
        logits = None if tuned["kept_step"] == 0 else tuned["logits"]["valid"]
        pctr = cross_fitted_pctr(settings, splits["train"], valid, logits)
        columns = ("impression_id", "user_id", "shown_at", "is_clicked", "is_ranked_user")
        valid.select(columns).with_columns(pctr=pctr).write_parquet(work / f"lever-{name}-valid.parquet")
        labels, ranked = valid["is_clicked"].cast(pl.Int8).to_numpy(), valid["is_ranked_user"].to_numpy()
        scores = metrics(labels, pctr, ranking_lists(valid["user_id"], valid["shown_at"]))
        ranked_lists = ranking_lists(valid["user_id"].filter(ranked), valid["shown_at"].filter(ranked))
        results[name] = {"overrides": overrides, "kept_step": tuned["kept_step"], "match_tuned": tuned["match_tuned"]}
        results[name] |= {k: scores[k] for k in ("logloss", "auc", "gauc", "ndcg@10")}
        results[name] |= {"ranked_gauc": metrics(labels[ranked], pctr[ranked], ranked_lists)["gauc"]}
        results[name] |= {"valid_pairs": valid.height, "valid_clicks": int(labels.sum())}
        results[name] |= {"seconds": round(time.monotonic() - started, 1), "git_commit": git_commit()}
        print(f"lever {name}: {results[name]}", flush=True)
    earlier = json.loads(out.read_text())["levers"] if out.exists() and args.only else {}
    same_code = {name: lever for name, lever in earlier.items() if lever.get("git_commit") == git_commit()}
    levers = same_code | results  # levers measured by other code are not comparable: dropped
    for name, lever in levers.items():
        if name != DEFAULT and (work / f"lever-{name}-valid.parquet").exists():
            lever["vs_default"] = lever_interval(work, name)
            lever["vs_default_ranked"] = lever_interval(work, name, ranked_only=True)
    record = {"seed": seed, "split": "validation", "git_commit": git_commit(), "levers": levers}
    out.write_text(json.dumps(record, indent=2) + "\n")
    write_block(args.out_dir / "benchmarks.md", out.stem, levers_section(record), f"Levers: {args.name}")
    return levers


def lever_interval(work: Path, name: str, ranked_only: bool = False) -> dict:
    """lever - default on the validation pairs both scored (joined by impression; ranked_only: of the users
    rerank ranks that day), per LEVER_METRICS."""
    default = pl.read_parquet(work / f"lever-{DEFAULT}-valid.parquet")
    lever = pl.read_parquet(work / f"lever-{name}-valid.parquet").select("impression_id", pctr_lever="pctr")
    both = default.join(lever, on="impression_id")
    if ranked_only:
        both = both.filter(pl.col("is_ranked_user"))
    scored = Scored(
        both["user_id"].cast(pl.String).to_numpy(),
        both["is_clicked"].cast(pl.Int8).to_numpy(),
        {"lever": both["pctr_lever"].to_numpy(), DEFAULT: both["pctr"].to_numpy()},
        ranking_lists(both["user_id"], both["shown_at"]),
    )
    return {m: paired_interval([scored], "lever", DEFAULT, m, BOOTSTRAP_REPLICATES).as_dict() for m in LEVER_METRICS}


def ece_noise_floor(pctr: np.ndarray, seed: int) -> float:
    """The equal-mass ECE a perfectly calibrated model with these predictions would show on this many pairs:
    the mean over label draws from pctr itself. An ECE near it is calibration within the noise."""
    if len(pctr) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    draws = [expected_calibration_error_equal_mass(rng.random(len(pctr)) < pctr, pctr) for _ in range(ECE_NOISE_DRAWS)]
    return float(np.mean(draws))


def summarize(runs: list[dict]) -> dict:
    """Means over seeds per model and slice; per slice and metric, the default minus the best peer and minus
    priors_only (the text's contribution), with paired intervals; the default's ECE noise floor per slice."""
    models = list(dict.fromkeys(m for run in runs for m in run["predictions"]))
    means: dict = {}
    for model in models:
        rows = pl.concat([run["table"].filter(pl.col("model") == model) for run in runs if model in run["predictions"]])
        means[model] = {
            row["slice"]: {k: row[k] for k in (*REPORTED, "pairs", "clicks")}
            for row in rows.group_by("slice").agg(pl.all().exclude("model").mean()).iter_rows(named=True)
        }
    versus_peer: dict = {}
    for metric in INTERVAL_METRICS:
        versus_peer[metric] = {}
        for slice_name in SLICES:
            peer = protocol.best_peer(means, PEERS, metric, slice_name)
            interval = protocol.paired_bootstrap(runs, DEFAULT, peer, slice_name, metric, BOOTSTRAP_REPLICATES, 0)
            versus_peer[metric][slice_name] = {"peer": peer} | interval.as_dict()
    contribution = {
        slice_name: {
            metric: protocol.paired_bootstrap(
                runs, DEFAULT, PRIORS_ONLY, slice_name, metric, BOOTSTRAP_REPLICATES, 0
            ).as_dict()
            for metric in CONTRIBUTION_METRICS
        }
        for slice_name in SLICES
    }
    noise = {
        slice_name: float(
            np.mean(
                [
                    ece_noise_floor(run["predictions"][DEFAULT][slice_masks(run["test"])[slice_name]], run["seed"])
                    for run in runs
                ]
            )
        )
        for slice_name in SLICES
    }
    return {
        "models": means,
        "versus_best_peer": versus_peer,
        "text_contribution": contribution,
        "ece_noise_floor": noise,
    }


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
    logs, data_checksum = protocol.source_logs(args.data, args.logs, work, args.name)  # --sample: neither given
    if args.levers:
        return run_levers(args, logs)
    timings: dict[str, float] = {}
    runs, commit = [], git_commit()
    for seed in args.seeds:
        saved = work / args.name / f"run-{seed}.pkl"  # scratch: a crash in the summary keeps the trained seeds
        if args.resume and saved.exists():
            run = pickle.loads(saved.read_bytes())
            if run.get("commit") == commit and not run.get("dirty", True) and not git_dirty():
                runs.append(run)
                continue
            print(f"seed {seed}: not resumed: scored by commit {run.get('commit')}, this is {commit}", flush=True)
        runs.append(run_seed(args, logs, seed, timings))
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_bytes(pickle.dumps(runs[-1]))
    summary = summarize(runs)
    settings = bench_settings(args, logs, args.seeds[0])
    stem = f"quality-{args.name}" + ("-quick" if args.quick else "")
    result = summary | {
        "default_model": DEFAULT,
        "peers": PEERS,
        "headline_slice": HEADLINE,
        "slices": list(SLICES),
        "features_as_of": settings.data.features_as_of,
        "seeds": list(args.seeds),
        "kept_step": {DEFAULT: [run["kept_step"][DEFAULT] for run in runs]},
        "validation_at_kept_step": {run["seed"]: run["validation"][DEFAULT] for run in runs},
        "selection": {run["seed"]: run["selection"] for run in runs},
        "cold_fit": {run["seed"]: run["cold_fit"] for run in runs},
        "first_champion_gates": {run["seed"]: run["gates"] for run in runs},
        "valid_clicks": [run["valid_clicks"] for run in runs],
        "per_seed": {run["seed"]: run["table"].to_dicts() for run in runs},
        "mode": "quick" if args.quick else "full",
        "data": args.name,
        "data_checksum_sha256": data_checksum,
        "pairs": runs[0]["pairs"],
        "cold_items": runs[0]["cold_items"],
        "hardware": hardware(),
        "config": settings.model_dump(mode="json", include={"data", "model", "training", "ranking", "promotion"}),
        "departures_from_defaults": departures_from_defaults(settings),
        "git_commit": commit,
        "git_dirty": git_dirty(),
        "seconds": timings | {"total": round(time.monotonic() - started, 1)},
        "command": command_line(),
    }
    image = args.out_dir / "benchmarks" / f"{stem}-reliability.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    reliability_diagram(runs, image)
    write_outputs(args.out_dir, stem, result)
    log_to_mlflow(settings, result, image)
    return result


def git_dirty() -> bool:
    """Whether the checkout has uncommitted changes to tracked files (the commit then does not name the code)."""
    found = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    )
    return bool(found.stdout.strip()) if found.returncode == 0 else True


def _interval(entry: dict) -> str:
    low, high = entry["interval"]
    return "n/a" if entry["mean"] != entry["mean"] else f"{entry['mean']:+.4f} [{low:+.4f}, {high:+.4f}]"


def markdown_tables(result: dict) -> str:
    """The headline (ranked_users) table, what the text adds and the default against the best peer per slice,
    then every model on every slice; all from the result's JSON."""
    columns = ("gauc", "auc", "ndcg@10", "logloss", "ece_equal_mass", "calibration_ratio")
    header = "| model | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns)
    headline = result["headline_slice"]
    rows = [
        f"| {m} | " + " | ".join(f"{v[headline][c]:.4f}" for c in columns) + " |" for m, v in result["models"].items()
    ]
    contribution = ["| slice | pairs (clicks) | gAUC | AUC | NDCG@10 |", "|---|---|---|---|---|"]
    versus = ["| slice | metric | best peer | default − peer [95% interval] |", "|---|---|---|---|"]
    default = result["models"][result["default_model"]]
    for slice_name in result["slices"]:
        size = f"{default[slice_name]['pairs']:.0f} ({default[slice_name]['clicks']:.0f})"
        gains = result["text_contribution"][slice_name]
        contribution.append(
            f"| {slice_name} | {size} | " + " | ".join(_interval(gains[m]) for m in CONTRIBUTION_METRICS) + " |"
        )
        for metric in INTERVAL_METRICS:
            entry = result["versus_best_peer"][metric][slice_name]
            versus.append(f"| {slice_name} | {metric} | {entry['peer']} | {_interval(entry)} |")
    full = ["| model | slice | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for model, slices in result["models"].items():
        for slice_name in result["slices"]:
            full.append(
                f"| {model} | {slice_name} | " + " | ".join(f"{slices[slice_name][c]:.4f}" for c in columns) + " |"
            )
    noise = ", ".join(f"{name} {value:.3f}" for name, value in result["ece_noise_floor"].items())
    return (
        f"**{headline}** (the users rerank ranks that day), mean over seeds:\n\n{header}\n"
        + "\n".join(rows)
        + "\n\nWhat the text adds: the default minus its output layer without text (`priors_only`: no fine-tuned "
        "logit, no semantic match), mean over seeds [95% paired user bootstrap]. `priors_and_match` is the default "
        "without its fine-tuned logit (step 0: the priors and the semantic match):\n\n"
        + "\n".join(contribution)
        + "\n\nThe default minus the best peer per slice and metric (calibration ratio: difference of |ratio − 1|; "
        "logloss and ECE: below 0 is better):\n\n"
        + "\n".join(versus)
        + "\n\nEvery model on every slice:\n\n"
        + "\n".join(full)
        + f"\n\nECE (equal mass) a perfectly calibrated default would show on these pairs (label draws from its own "
        f"pCTR): {noise}.\n"
    )


def section(result: dict) -> str:
    """docs/benchmarks.md's block of a reported run: how it was run, then markdown_tables."""
    kept = ", ".join(str(step) for step in result["kept_step"][result["default_model"]])
    match = ", ".join("tuned" if chosen["match_tuned"] else "zero-shot" for chosen in result["selection"].values())
    return (
        f"Command: `{result['command']}` at commit `{result['git_commit'][:12]}`"
        + (" (with uncommitted changes)" if result["git_dirty"] else "")
        + f"  \nMode: {result['mode']} · features as of {result['features_as_of']} · seeds {result['seeds']} · "
        f"data sha256 `{result['data_checksum_sha256'][:16]}…` · {result['hardware']} · "
        f"wall time {result['seconds']['total'] / 60:.1f} min · pairs (first seed) {result['pairs']} · "
        f"validation clicks {result['valid_clicks']} · kept steps {kept} · served match {match} · config: "
        f"adrank's defaults except "
        f"{result['departures_from_defaults'] or 'nothing'}\n\n" + markdown_tables(result)
    )


def headline(result: dict) -> str:
    """README's headline: the default on the users rerank ranks against its best peer and its priors alone,
    and what the text adds on ads new to the model (gAUC, mean over seeds [95% paired interval])."""
    slice_name, default = result["headline_slice"], result["models"][result["default_model"]]
    versus = result["versus_best_peer"]["gauc"][slice_name]
    text, new_ads = result["text_contribution"][slice_name]["gauc"], result["text_contribution"]["new_ads"]["gauc"]
    return (
        f"Headline (`{result['data']}`, commit `{result['git_commit'][:7]}`, {len(result['seeds'])} seeds, gAUC "
        f"[95% paired interval]): on the users rerank ranks (`{slice_name}`) the default scores "
        f"{default[slice_name]['gauc']:.3f}; minus the best peer ({versus['peer']}) {_interval(versus)}; minus its "
        f"priors alone (what the text adds) {_interval(text)}; on ads new to the model the text adds "
        f"{_interval(new_ads)}.\n"
    )


def levers_section(record: dict) -> str:
    """docs/benchmarks.md's block of a --levers run: each lever on validation, minus the default."""
    header = (
        "| lever | config overrides | kept step | served match | logloss | AUC | gAUC | NDCG@10 | ranked users' gAUC "
        "| lever − default: logloss / AUC / gAUC [95%] | on ranked users: gAUC | wall time |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for name, lever in record["levers"].items():
        overrides = json.dumps(lever["overrides"]) if lever["overrides"] else "none (the default)"
        versus = lever.get("vs_default")
        gains = " / ".join(_interval(versus[m]) for m in ("logloss", "auc", "gauc")) if versus else "—"
        ranked = _interval(lever["vs_default_ranked"]["gauc"]) if "vs_default_ranked" in lever else "—"
        # ranked_gauc: not in lever runs made before it was measured
        figures = " | ".join(
            f"{lever[m]:.4f}" if m in lever else "—" for m in ("logloss", "auc", "gauc", "ndcg@10", "ranked_gauc")
        )
        rows.append(
            f"| {name} | `{overrides}` | {lever['kept_step']} | {'tuned' if lever['match_tuned'] else 'zero-shot'} "
            f"| {figures} | {gains} | {ranked} | {lever['seconds'] / 60:.1f} min |"
        )
    first = next(iter(record["levers"].values()))
    return (
        f"Seed {record['seed']}, {record['split']} only ({first['valid_pairs']:,} pairs, {first['valid_clicks']:,} "
        f"clicks; the served score at the kept step, output layer cross-fitted), "
        f"commit `{record['git_commit'][:12]}`:\n\n" + header + "\n" + "\n".join(rows) + "\n"
    )


def write_outputs(out_dir: Path, stem: str, result: dict) -> None:
    (out_dir / "benchmarks" / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_block(out_dir / "benchmarks.md", stem, section(result), f"Quality: {result['data']} ({result['mode']})")
    if stem in HEADLINE_RUNS:
        write_block(out_dir.parent / "README.md", HEADLINE_RUNS[stem], headline(result), "Benchmarks")


def log_to_mlflow(settings: Settings, result: dict, image: Path) -> None:
    experiment_id = configure_tracking(settings)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"quality-{result['data']}-{result['mode']}"):
        mlflow.log_params(
            {
                "mode": result["mode"],
                "seeds": result["seeds"],
                "features_as_of": result["features_as_of"],
                "data_checksum": result["data_checksum_sha256"],
                "git_commit": result["git_commit"],
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
