"""The sample market's ceiling: how well its own click model ranks a quality run's test split, beside what the
run's models reached there. The floors of issue 21 are gains over the best peer; this says how much room the
data leaves above that peer.

    python benchmarks/quality.py --sample --quick --work W                 # first: the runs, W/sample/run-<seed>.pkl
    python benchmarks/sample_ceiling.py --runs W/sample --out docs/benchmarks/ceiling-sample-quick.json   # ~1 min

The embedded market (tasks/sample_data.py, adrank sample-data's defaults) is regenerated with the hidden terms of
each impression's click, which no model sees (the user's interest in the ad's product, the ad's quality), and
matched to each run's test pairs row by row (the same impressions in the same order, or it stops). Ceilings:
- click_model: the click's log-odds at the position it was shown, noise aside: what the labels' own model
  ranks (the best any scorer of these pairs can do, up to the noise);
- click_model_served: the same at position 1, as rerank serves (no score knows the position it will get);
- interest_only: the interest term alone, without the ad's quality: what the texts could tell at most.
Each is scored on the run's slices (tasks/evaluate.py) with the models the run scored; intervals: the ceiling
minus the default and minus the best peer, paired user bootstrap over the runs' seeds (benchmarks/protocol.py).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import protocol  # noqa: E402
from benchmarks.docs_blocks import DOC, command_line, hardware, write_block  # noqa: E402
from benchmarks.quality import BOOTSTRAP_REPLICATES, DEFAULT, HEADLINE, PEERS  # noqa: E402
from tasks.config import SampleDataConfig  # noqa: E402
from tasks.evaluate import SLICES, evaluation_table  # noqa: E402
from tasks.intervals import Interval  # noqa: E402
from tasks.registry import git_commit  # noqa: E402
from tasks.sample_data import click_logit, sample_market  # noqa: E402

SERVED_CEILING = "click_model_served"
CEILINGS = ("click_model", SERVED_CEILING, "interest_only")
METRICS = ("gauc", "auc")
FLOOR_GAIN = 0.03  # issue 21's floor on the sample market: the default above the best peer by this, gAUC
BOOTSTRAP_SEED = 0  # as benchmarks/quality.py's intervals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True, help="a quality run's <work>/sample folder (run-*.pkl)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write; its stem names the docs block")
    args = parser.parse_args()
    runs = [pickle.loads(path.read_bytes()) for path in sorted(args.runs.glob("run-*.pkl"))]
    if not runs:
        raise SystemExit(f"{args.runs}: no run-*.pkl (run benchmarks/quality.py --sample first)")
    result = ceiling(runs, click_frame(SampleDataConfig())) | {
        "runs_commit": sorted({run["commit"] for run in runs}),
        "commit": git_commit(),
        "hardware": hardware(),
        "command": command_line(),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.out.resolve().parent == DOC.parent / "benchmarks":
        write_block(DOC, args.out.stem, markdown(result), "The sample market's ceiling")
    print(markdown(result))


def click_frame(config: SampleDataConfig) -> pl.DataFrame:
    """Every impression of the market, in the order test pairs are sorted (shown_at, then impression_id as the
    text adrank casts it to: sql/stg_impressions.sql), with its ceilings' log-odds."""
    market = sample_market(config)
    impressions = pl.from_arrow(market.impressions.select(["ts", "user_id", "clicked"]))
    terms = pl.from_arrow(market.click_terms)  # row for row the impressions'
    frame = pl.concat([impressions, terms], how="horizontal")
    frame = frame.sort("ts", pl.col("impression_id").cast(pl.String))
    interest, quality, position = (frame[c].to_numpy() for c in ("interest", "ad_quality", "position"))
    return frame.with_columns(
        pl.Series("click_model", click_logit(interest, quality, position)),
        pl.Series(SERVED_CEILING, click_logit(interest, quality, 1)),
        pl.Series("interest_only", click_logit(interest, 0.0, 1)),
    )


def aligned(test: pl.DataFrame, clicks: pl.DataFrame) -> pl.DataFrame:
    """The market's impressions behind a run's test pairs (its last test.height, in order), checked row by row
    on user, time and label: a run of another market, or of pairs in another order, stops here."""
    if test.height > clicks.height:
        raise ValueError(f"the run has {test.height} test pairs, the sample market {clicks.height} impressions")
    tail = clicks.tail(test.height)
    same = (
        (tail["user_id"] == test["user_id"].cast(pl.String))
        & (tail["ts"] == test["shown_at"])
        & (tail["clicked"] == test["is_clicked"])
    ).to_numpy()
    if not same.all():
        row = int(np.argmin(same))
        raise ValueError(
            f"the run's test pairs are not the sample market's last {test.height} impressions: test row {row} "
            f"{test.row(row, named=True)} vs impression {tail.row(row, named=True)}"
        )
    return tail


def ceiling(runs: list[dict], clicks: pl.DataFrame) -> dict:
    """Means over the runs per model and slice (ceilings, the default, the peers), and per metric and slice the
    served ceiling minus the default and minus the best peer, with intervals."""
    for run in runs:
        tail = aligned(run["test"], clicks)
        run["predictions"] |= {name: 1 / (1 + np.exp(-tail[name].to_numpy())) for name in CEILINGS}
        run["table"] = evaluation_table(run["test"], {m: run["predictions"][m] for m in (*CEILINGS, DEFAULT, *PEERS)})
    rows = pl.concat([run["table"] for run in runs]).group_by("model", "slice").agg(pl.all().mean())
    means: dict = {}
    for row in rows.iter_rows(named=True):
        means.setdefault(row["model"], {})[row["slice"]] = {k: row[k] for k in (*METRICS, "pairs", "clicks")}
    headroom: dict = {}
    for metric in METRICS:
        headroom[metric] = {}
        for slice_name in SLICES:
            peer = protocol.best_peer(means, PEERS, metric, slice_name)
            headroom[metric][slice_name] = {"peer": peer} | {
                f"minus_{name}": protocol.paired_bootstrap(
                    runs, SERVED_CEILING, model, slice_name, metric, BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED
                ).as_dict()
                for name, model in (("default", DEFAULT), ("peer", peer))
            }
    return {"seeds": [run["seed"] for run in runs], "models": means, "headroom": headroom}


def markdown(result: dict) -> str:
    """The docs block: per slice, each ceiling's and model's mean gAUC / AUC, then the served ceiling's lead."""
    models = [*CEILINGS, DEFAULT, *PEERS]
    lines = [
        f"`{result['command']}` at `{result['commit']}` ({result['hardware']}), over the quality runs of "
        f"`{', '.join(c[:7] for c in result['runs_commit'])}` (seeds {', '.join(map(str, result['seeds']))}); "
        "mean gAUC / AUC on each run's test split.",
        "",
        "| slice | " + " | ".join(models) + " |",
        "|---" * (len(models) + 1) + "|",
    ]
    for slice_name in SLICES:
        cells = []
        for model in models:
            row = result["models"][model].get(slice_name, {})
            cells.append(" / ".join(f"{row.get(m, float('nan')):.3f}" for m in METRICS))
        lines.append(f"| {slice_name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"{SERVED_CEILING} minus the default and minus the best peer (paired bootstrap over users, 95%):",
        "",
        "| slice | metric | best peer | ceiling − default | ceiling − best peer |",
        "|---|---|---|---|---|",
    ]
    for slice_name in SLICES:
        for metric in METRICS:
            row = result["headroom"][metric][slice_name]
            default, peer = (Interval(row[k]["mean"], *row[k]["interval"]) for k in ("minus_default", "minus_peer"))
            lines.append(f"| {slice_name} | {metric} | {row['peer']} | {default} | {peer} |")
    peer_room = result["headroom"]["gauc"][HEADLINE]["minus_peer"]["mean"]
    lines += [
        "",
        f"The floor asks the default for +{FLOOR_GAIN} gAUC over the best peer on {HEADLINE}: "
        f"{FLOOR_GAIN / peer_room:.0%} of the room the served ceiling leaves above that peer."
        if peer_room > 0
        else f"The best peer is at or above the served ceiling on {HEADLINE}: no room for the floor's +{FLOOR_GAIN}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
