"""Throughput of the semantic match on this machine, beside the cross-encoder's, in one run: the sizing guide's
(benchmarks/sizing.py) rates for the match's share of a night.

    python benchmarks/match_rates.py          # ~1 min on 2 CPU cores

On the embedded sample market's training pairs (adrank sample-data's defaults, built as retrain builds them),
with the default config's packaged base model: tuning the match's encoder as the default tunes it (clicks/s:
each click is a user text, its items, its ad's text and the ads its user passed over, forward and backward,
tasks/semantic_match.py tune_match_encoder), embedding texts for
the match (texts/s, inference) and training the cross-encoder (pairs/s, one optimizer step of batch_size
pairs at a time, the loop of tasks/train.py fine_tune). Writes docs/benchmarks/match_rates.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.docs_blocks import command_line, hardware  # noqa: E402
from tasks.config import load_settings  # noqa: E402
from tasks.model import collate, load_cross_encoder, pick_device, seed_everything, tokenize_pairs  # noqa: E402
from tasks.pairs import build_pairs  # noqa: E402
from tasks.registry import git_commit  # noqa: E402
from tasks.sample_data import generate_sample_logs  # noqa: E402
from tasks.semantic_match import load_match_encoder, tune_match_encoder  # noqa: E402
from tasks.train import match_clicks, match_tuning  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clicks", type=int, default=960, help="training clicks the match is tuned on")
    parser.add_argument("--texts", type=int, default=2000, help="distinct texts embedded")
    parser.add_argument("--train-steps", type=int, default=40, help="cross-encoder optimizer steps timed")
    parser.add_argument("--work", type=Path, default=Path("adrank_home/benchmarks/match_rates"), help="scratch")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "match_rates.json")
    return parser.parse_args()


def sample_pairs(work: Path) -> pl.DataFrame:
    """The sample market's training pairs, built by adrank's own build_pairs."""
    shutil.rmtree(work, ignore_errors=True)
    settings = load_settings({"home": str(work / "home"), "data": {"logs": str(work / "logs")}})
    generate_sample_logs(settings.sample, work / "logs")
    build_pairs(settings)
    return pl.read_parquet(settings.pairs_dir / "train.parquet")


def timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    settings, device = load_settings(), pick_device()
    cfg, max_length = settings.training, settings.model.max_seq_length
    train = sample_pairs(args.work.resolve())
    clicks = match_clicks(train, cfg.match_passed_over, cfg.seed).head(args.clicks)
    seed_everything(cfg.seed)

    share = settings.model.match_item_share
    encoder = load_match_encoder(settings.model.base_model, device, max_length, cfg.eval_batch_size, share)
    tuning = match_tuning(settings)
    tune_seconds = timed(tune_match_encoder, encoder, clicks, tuning)
    texts = pl.concat([train["user_text"], train["ad_text"]]).unique(maintain_order=True).head(args.texts).to_list()
    embed_seconds = timed(encoder.embed, texts)

    model, tokenizer = load_cross_encoder(settings.model.base_model, device, pooling=settings.model.pooling)
    pairs = train.head(cfg.batch_size * args.train_steps)
    encodings = tokenize_pairs(tokenizer, pairs["user_text"], pairs["ad_text"], max_length)
    labels = torch.tensor(pairs["is_clicked"].cast(pl.Float32).to_numpy())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()

    def train_steps() -> None:
        for start in range(0, len(encodings), cfg.batch_size):
            batch = collate(tokenizer, encodings[start : start + cfg.batch_size], device)
            loss = loss_fn(model(**batch).logits.squeeze(-1), labels[start : start + cfg.batch_size].to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    train_seconds = timed(train_steps)
    record = {
        "match_tuning_clicks_per_s": clicks.height / tune_seconds,
        "match_embed_texts_per_s": len(texts) / embed_seconds,
        "cross_encoder_train_pairs_per_s": pairs.height / train_seconds,
        "clicks": clicks.height,
        "match_batch_size": tuning.batch_size,
        "match_item_share": share,
        "match_passed_over": cfg.match_passed_over,
        "texts": len(texts),
        "train_pairs": pairs.height,
        "batch_size": cfg.batch_size,
        "max_seq_length": max_length,
        "seconds": {"tuning": tune_seconds, "embedding": embed_seconds, "training": train_seconds},
        "hardware": hardware(),
        "git_commit": git_commit(),
        "command": command_line(),
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k.endswith("_per_s")}, indent=2))


if __name__ == "__main__":
    main()
