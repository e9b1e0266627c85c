"""Fine-tune the cross-encoder on click logs with binary cross-entropy."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from transformers import get_linear_schedule_with_warmup

from tasks.config import Settings
from tasks.metrics import logloss, roc_auc
from tasks.model import (
    Calibration,
    ad_click_log_odds,
    collate,
    fit_calibration,
    load_cross_encoder,
    pick_device,
    predict_logits,
    save_calibration,
    seed_everything,
    tokenize_pairs,
)

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


@dataclass
class TrainResult:
    checkpoint: Path
    best_valid_logloss: float
    steps: int
    stopped_early: bool
    # one row per validation: step, epoch, train_loss, valid_logloss, valid_auc
    history: list[dict[str, float]] = field(default_factory=list)


def freeze_lower_layers(model: torch.nn.Module, trainable_layers: int | None) -> None:
    """Freeze the embeddings and all but the top `trainable_layers` transformer layers (None: train all).

    Everything outside the embeddings and the numbered layers (pooler, classifier) stays trainable.
    """
    if trainable_layers is None:
        return
    first_trained = model.config.num_hidden_layers - trainable_layers
    for name, parameter in model.base_model.named_parameters():
        layer = re.search(r"(?:^|\.)layer\.(\d+)\.", name)
        if "embeddings" in name:
            parameter.requires_grad = False
        elif layer:
            parameter.requires_grad = int(layer.group(1)) >= first_trained


def fine_tune(settings: Settings, train_path: Path, valid_path: Path, out_dir: Path) -> TrainResult:
    """Train on train_path, early-stop on valid_path logloss, save the best model to out_dir."""
    cfg, max_length = settings.training, settings.model.max_seq_length

    # 1. seed, device, base model with a fresh one-logit head
    seed_everything(cfg.seed)
    device = pick_device()
    model, tokenizer = load_cross_encoder(settings.model.base_model, device, dropout=settings.model.dropout)
    freeze_lower_layers(model, cfg.trainable_layers)

    # 2. data: tokenise once; batches are padded per batch
    train = pl.read_parquet(train_path, columns=["ad_id", "user_text", "ad_text", "is_clicked"])
    valid = pl.read_parquet(valid_path, columns=["ad_id", "user_text", "ad_text", "is_clicked"])
    encodings = tokenize_pairs(tokenizer, train["user_text"], train["ad_text"], max_length)
    labels = torch.tensor(train["is_clicked"].cast(pl.Float32).to_numpy())
    valid_labels = valid["is_clicked"].cast(pl.Int8).to_numpy()

    # 3. optimizer: AdamW, no weight decay on biases and norms; linear warm-up then linear decay
    steps_per_epoch = math.ceil(len(encodings) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [
        {"params": [p for n, p in trained if not n.endswith(NO_DECAY)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in trained if n.endswith(NO_DECAY)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    schedule = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), max(total_steps, 1))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def validate(step: int, epoch: float, train_loss: float) -> tuple[float, np.ndarray]:
        logits = predict_logits(model, tokenizer, valid["user_text"], valid["ad_text"], max_length, cfg.eval_batch_size)
        pctr = Calibration().apply(logits)  # uncalibrated: the calibration is fitted after training
        row = {
            "step": step,
            "epoch": epoch,
            "train_loss": train_loss,
            "valid_logloss": logloss(valid_labels, pctr),
            "valid_auc": roc_auc(valid_labels, pctr),
        }
        result.history.append(row)
        print(
            f"step {step:>6} epoch {epoch:5.2f} train_loss {train_loss:.4f} "
            f"valid_logloss {row['valid_logloss']:.4f} valid_auc {row['valid_auc']:.4f}"
        )
        return row["valid_logloss"], logits

    def save_if_best(valid_loss: float, logits: np.ndarray) -> bool:
        if valid_loss < result.best_valid_logloss:
            result.best_valid_logloss = valid_loss
            best_valid_logits[:] = logits  # (valid pairs,): what the calibration is fitted on
            model.save_pretrained(out_dir, safe_serialization=True)
            tokenizer.save_pretrained(out_dir)
            return True
        return False

    # 4. the untrained model is the first candidate: training must beat it to be kept
    result = TrainResult(checkpoint=out_dir, best_valid_logloss=math.inf, steps=0, stopped_early=False)
    best_valid_logits = np.zeros(valid.height, dtype=np.float32)
    save_if_best(*validate(step=0, epoch=0.0, train_loss=math.nan))

    # 5. train; validate each epoch (and every eval_every_steps); stop after `patience` misses
    generator = torch.Generator().manual_seed(cfg.seed)
    misses, running_loss, running_n = 0, 0.0, 0
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(encodings), generator=generator).tolist()
        for start in range(0, len(order), cfg.batch_size):
            index = order[start : start + cfg.batch_size]
            batch = collate(tokenizer, [encodings[i] for i in index], device)
            with autocast:
                logits = model(**batch).logits.squeeze(-1)  # (batch,)
            loss = loss_fn(logits.float(), labels[index].to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps += 1
            running_loss, running_n = running_loss + loss.item(), running_n + 1

            end_of_epoch = start + cfg.batch_size >= len(order)
            if end_of_epoch or (cfg.eval_every_steps and result.steps % cfg.eval_every_steps == 0):
                validation = validate(result.steps, result.steps / steps_per_epoch, running_loss / running_n)
                running_loss, running_n = 0.0, 0
                misses = 0 if save_if_best(*validation) else misses + 1
                result.stopped_early = misses >= cfg.patience
                if result.stopped_early:
                    break
        if result.stopped_early:
            break

    # 6. fit the output layer on the best model's validation logits, saved beside its weights
    save_calibration(calibrate(settings, train, valid, best_valid_logits), out_dir)
    return result


def calibrate(settings: Settings, train: pl.DataFrame, valid: pl.DataFrame, valid_logits: np.ndarray) -> Calibration:
    """Platt scaling on validation; with the ad prior, each ad's click log-odds come from the training split."""
    method, labels = settings.model.calibration, valid["is_clicked"].cast(pl.Int8).to_numpy()
    if method == "none":
        return Calibration()
    prior = None
    if method == "platt+ad_prior":
        clicks = train["is_clicked"].cast(pl.Float64).to_numpy()
        log_odds, default = ad_click_log_odds(train["ad_id"].to_list(), clicks, settings.model.ad_prior_strength)
        prior = Calibration(ad_log_odds=log_odds, default_ad_log_odds=default)
    return fit_calibration(valid_logits, labels, valid["ad_id"].to_list(), prior)
