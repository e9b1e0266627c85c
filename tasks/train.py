"""Fine-tune the cross-encoder on click logs with binary cross-entropy."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from torch.nn.parallel import DistributedDataParallel
from transformers import get_linear_schedule_with_warmup

from tasks.config import Settings, TrainingConfig
from tasks.intervals import Interval, Scored, beyond_the_noise, paired_interval
from tasks.metrics import logloss, ranking_lists, roc_auc
from tasks.model import (
    collate,
    load_cross_encoder,
    pick_device,
    predict_logits,
    save_cross_encoder,
    seed_everything,
    tokenize_pairs,
)
from tasks.output_layer import (
    AD_PRIOR_COLUMNS,
    PRIOR_COLUMNS,
    PROBABILITY_BOUNDS,
    SIMILAR_COLUMNS,
    USER_PRIOR_COLUMNS,
    Calibration,
    PairPriors,
    fit_calibration,
    logistic_fit,
    probability_log_odds,
    save_calibration,
)
from tasks.pairs import read_ad_texts
from tasks.progress import StageProgress
from tasks.semantic_match import (
    MATCH_COLUMN,
    PASSED_OVER,
    MatchEncoder,
    MatchTuning,
    load_match_encoder,
    save_match_encoder,
    tune_match_encoder,
    with_served_match,
)

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
SELECTION_METRICS = ("logloss", "auc", "gauc")  # the selection decision's intervals (text_gain)
SELECTION_FILE = "selection.json"  # beside the kept weights: the kept step and its text_gain
LOGIT_STATES = ("best_valid_logits", "best_trained_logits")  # (selection pairs,) arrays of the resume state
LOGLOSS_TIE = 1e-9  # a step must beat the best by more than rounding (a text term adding nothing ties the priors)
# validation users split in two for the selection: each half is scored by the output layer fitted on the other
CROSS_FIT_FOLDS = 2
ROW = "_row"  # a sample's position in validation, to keep validation's order
ServedOn = tuple[pl.DataFrame, np.ndarray | None]  # validation (with its match column) and logits (None: step 0)


@dataclass
class TrainResult:
    checkpoint: Path
    best_valid_logloss: float  # of the served score: the output layer fitted on the kept step's logits
    steps: int
    stopped_early: bool
    # one row per validation: step, epoch, train_loss, valid_logloss, valid_auc (served), valid_raw_logloss
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int = 0  # the step whose weights were kept (0: none beat step 0, served without the logit)
    step_losses: list[float] = field(default_factory=list)  # training loss of each optimizer step, in order
    valid_pctr: np.ndarray | None = None  # (valid pairs,): the served pCTR of the kept step on validation
    valid_logits: np.ndarray | None = None  # (valid pairs,): the kept step's logits (None: step 0, no logit)
    # the selection decision on validation: the best trained step's served score minus step 0's
    # (step 0), per metric (logloss: below 0 is better), with paired user-bootstrap intervals
    text_gain: dict[str, Interval] = field(default_factory=dict)
    best_trained_step: int | None = None  # the trained step text_gain is of (None: no step was trained)
    valid_clicks: int = 0  # of the pairs the steps were compared on (training.selection_pairs)
    # the match's tuning decision (tune_match): served with the tuned encoder or the zero-shot one, and step 0's
    # validation score with the tuned encoder minus with the zero-shot one, per metric (empty: not tuned)
    match_tuned: bool = False
    match_gain: dict[str, Interval] = field(default_factory=dict)


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


def fine_tune(
    settings: Settings,
    train_path: Path,
    valid_path: Path,
    out_dir: Path,
    on_step: Callable[[int, list[int], torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Train on train_path, early-stop on the served score's validation logloss (the output layer fitted on
    each validation's logits, cross-fitted), against step 0 (the output layer without the logit: the priors
    and the semantic match); save the kept model and its output layer to out_dir.

    Under torchrun (a process group set up by tasks/train_worker.py) each rank trains on its share of every
    step's pairs through DistributedDataParallel; rank 0 alone validates, decides, saves and calibrates, and
    its result is the run's. on_step(epoch, the pair indices this rank trained on, model) runs after each
    optimizer step (tests)."""
    cfg, max_length = settings.training, settings.model.max_seq_length
    rank, world = process_rank()
    lead = rank == 0  # validation, checkpoints, resume state, calibration and printing happen here

    # 1. seed, device, data (tokenised once, below; batches are padded per batch)
    seed_everything(cfg.seed)
    device = pick_device()
    if world > 1 and device.type == "cpu":  # the node's cores are shared by its ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    present = pl.read_parquet_schema(train_path)
    wanted = ("ad_id", "user_id", "shown_at", "user_text", "ad_text", "is_clicked", *PRIOR_COLUMNS)
    columns = [c for c in wanted if c in present]
    train = pl.read_parquet(train_path, columns=columns)
    valid = pl.read_parquet(valid_path)  # with the prior counts, for the output layer
    tuned = (
        train
        if cfg.sample_pairs is None or cfg.sample_pairs >= train.height
        else train.sample(cfg.sample_pairs, seed=cfg.seed)
    )

    # 2. the match's encoder, tuned on the clicks first (every rank alike: same seed, same clicks; a resumed run
    # tunes again), then frozen: the match is the same at every step
    match_encoder = base_match_encoder(settings, device)
    match_tuned, match_gain = False, {}
    if match_encoder is not None:  # validation gets the served encoder's match (MATCH_COLUMN) and affinity counts
        ads = read_ad_texts(valid_path.parent) if "affinity" in settings.model.terms else None
        valid, match_tuned, match_gain = tune_match(settings, match_encoder, train, tuned, valid, lead, ads)
    seed_everything(cfg.seed)  # the cross-encoder's run (head, dropout) is the same whatever the match did
    selection = selection_sample(valid, cfg)  # the pairs each step is compared on; the output layer gets all

    # 3. base model with a fresh one-logit head (DDP: every rank starts from rank 0's weights)
    model, tokenizer = load_cross_encoder(
        settings.model.base_model, device, dropout=settings.model.dropout, pooling=settings.model.pooling
    )
    if cfg.cross_encoder_from_match:
        model.base_model.load_state_dict(match_encoder.model.state_dict())
    freeze_lower_layers(model, cfg.trainable_layers)
    trainer = DistributedDataParallel(model) if world > 1 else model  # forward passes; model is the module itself
    valid_priors = PairPriors.of(valid)
    encodings = tokenize_pairs(tokenizer, tuned["user_text"], tuned["ad_text"], max_length)
    labels = torch.tensor(tuned["is_clicked"].cast(pl.Float32).to_numpy())
    selection_labels = selection["is_clicked"].cast(pl.Int8).to_numpy()
    if lead and selection_labels.sum() < cfg.min_valid_clicks:
        print(
            f"warning: validation holds {selection_labels.sum()} clicks (< training.min_valid_clicks "
            f"{cfg.min_valid_clicks}): the kept step and the output layer rest on few clicks (see the selection "
            "interval at the end)"
        )
    offsets = user_prior_offsets(settings, train, tuned) + ad_prior_offsets(settings, train, tuned, in_train=True)
    selection_offsets = user_prior_offsets(settings, train, selection) + ad_prior_offsets(settings, train, selection)
    if cfg.match_offset:
        tuned_match, match_weight = match_offsets(match_encoder, tuned)
        offsets = offsets + tuned_match
        selection_offsets = selection_offsets + match_weight * selection[MATCH_COLUMN].to_numpy()
    offsets = torch.tensor(offsets, dtype=torch.float32)
    groups = torch.tensor(user_days(tuned)) if cfg.ranking_loss_weight > 0 else None  # (pairs,) user-day ids

    # 4. optimizer: AdamW, no weight decay on biases and norms; linear warm-up then linear decay.
    # A step takes step_pairs of the epoch's order (the effective batch), shared out among the ranks.
    step_pairs = cfg.batch_size * cfg.gradient_accumulation_steps * world
    steps_per_epoch = math.ceil(len(encodings) / step_pairs)
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

    def validate(step: int, epoch: float, train_loss: float) -> tuple[float, np.ndarray | None]:
        """Score validation as it will be served: the output layer fitted on these logits (cross-fitted, see
        cross_fitted_pctr), then logloss and AUC of its pCTR (a raw logloss also punishes base-rate shifts
        that the output layer removes). Step 0 is the output layer without the logit (the priors and the semantic
        match): what is served unless a trained step beats it; an untrained head's logit is a random projection
        of the text."""
        logits = None
        if step > 0:
            texts = selection["user_text"], selection["ad_text"]
            logits = predict_logits(model, tokenizer, *texts, max_length, cfg.eval_batch_size)
        served = cross_fitted_pctr(settings, train, selection, logits)
        raw = math.nan if logits is None else logloss(selection_labels, Calibration().apply(logits + selection_offsets))
        row = {
            "step": step,
            "epoch": epoch,
            "train_loss": train_loss,
            "valid_logloss": logloss(selection_labels, served),
            "valid_auc": roc_auc(selection_labels, served),
            "valid_raw_logloss": raw,
        }
        result.history.append(row)
        print(
            f"step {step:>6} epoch {epoch:5.2f} train_loss {train_loss:.4f} valid_logloss {row['valid_logloss']:.4f} "
            f"valid_auc {row['valid_auc']:.4f} (served score; raw logloss {row['valid_raw_logloss']:.4f})"
        )
        return row["valid_logloss"], logits

    def save_if_best(valid_loss: float, logits: np.ndarray | None) -> bool:
        if logits is not None and valid_loss < best_trained["loss"]:  # the runner-up of step 0, for text_gain
            best_trained.update(loss=valid_loss, step=result.steps)
            best_trained_logits[:] = logits
        if valid_loss < result.best_valid_logloss - LOGLOSS_TIE:
            result.best_valid_logloss, result.best_step = valid_loss, result.steps
            if logits is not None:
                best_valid_logits[:] = logits  # (selection pairs,)
            save_cross_encoder(model, tokenizer, out_dir)
            return True
        return False

    # 5. step 0, the output layer without the logit (the untrained weights saved with it), is the first candidate,
    # unless a killed run with this data and config left a state
    result = TrainResult(checkpoint=out_dir, best_valid_logloss=math.inf, steps=0, stopped_early=False)
    result.match_tuned, result.match_gain = match_tuned, match_gain
    best_valid_logits = np.zeros(selection.height, dtype=np.float32)
    best_trained, best_trained_logits = {"loss": math.inf, "step": None}, np.zeros(selection.height, dtype=np.float32)
    generator = torch.Generator().manual_seed(cfg.seed)
    resume = resume_dir(settings, tuned, valid, world)
    loop = {"epoch": 0, "batch": 0, "misses": 0, "running_loss": 0.0, "running_n": 0}
    if (state := load_resume_state(resume, model, optimizer, schedule, rank)) is not None:
        loop, best_valid_logits[:] = state["loop"], state["best_valid_logits"]
        best_trained_logits[:] = state["best_trained_logits"]
        best_trained.update(state["best_trained"])
        result.steps, result.best_valid_logloss, result.history = state["steps"], state["best"], state["history"]
        result.best_step, result.step_losses = state.get("best_step", 0), state.get("step_losses", [])
        generator.set_state(state["epoch_generator"])
        if lead and Path(state["best_dir"]) != out_dir:
            shutil.copytree(state["best_dir"], out_dir, dirs_exist_ok=True)
        print(f"resuming from step {result.steps} ({resume})")
    elif lead:
        save_if_best(*validate(step=0, epoch=0.0, train_loss=math.nan))

    # 6. train; validate each epoch (and every eval_every_steps); stop after `patience` misses
    trainer.train()
    with StageProgress("fine_tune", total_steps, "steps", rate_unit="pairs") as bar:
        bar.advance(result.steps, rated=0)
        for epoch in range(loop["epoch"], cfg.epochs):
            epoch_generator = generator.get_state()
            order = epoch_order(len(encodings), groups, generator)
            for batch_index, start in enumerate(range(0, len(order), step_pairs)):
                if epoch == loop["epoch"] and batch_index < loop["batch"]:
                    continue  # done before the kill
                step_order = order[start : start + step_pairs]
                shards = step_shards(step_order, rank, world, cfg.gradient_accumulation_steps)
                step_loss = 0.0
                for micro, index in enumerate(shards):
                    # each pair weighs 1 / len(step_order) in the step's loss; DDP averages gradients over ranks
                    weight = len(index) * world / len(step_order)
                    index = index or step_order[:1]  # an empty share still joins the all-reduce, at weight 0
                    last = micro == len(shards) - 1  # gradients are all-reduced once, after the last micro-batch
                    with nullcontext() if last or world == 1 else trainer.no_sync():
                        batch = collate(tokenizer, [encodings[i] for i in index], device)
                        with autocast:
                            logits = trainer(**batch).logits.squeeze(-1)  # (batch,)
                        loss = loss_fn(logits.float() + offsets[index].to(device), labels[index].to(device))
                        if groups is not None:
                            loss = loss + cfg.ranking_loss_weight * pairwise_loss(
                                logits.float(), labels[index].to(device), groups[index].to(device)
                            )
                        (loss * weight).backward()
                    step_loss += loss.item() * weight / world
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                result.steps += 1
                result.step_losses.append(sum_over_ranks(step_loss, device))
                loop["running_loss"] += result.step_losses[-1]
                loop["running_n"] += 1
                bar.advance(1, rated=len(step_order), loss=loop["running_loss"] / loop["running_n"], epoch=epoch + 1)
                if on_step is not None:
                    on_step(epoch, [i for shard in shards for i in shard], model)

                end_of_epoch = start + step_pairs >= len(order)
                if end_of_epoch or (cfg.eval_every_steps and result.steps % cfg.eval_every_steps == 0):
                    if lead:
                        mean_loss = loop["running_loss"] / loop["running_n"]
                        validation = validate(result.steps, result.steps / steps_per_epoch, mean_loss)
                        loop["misses"] = 0 if save_if_best(*validation) else loop["misses"] + 1
                    loop["running_loss"], loop["running_n"] = 0.0, 0
                    # rank 0's decision, so that every rank stops (or goes on) at the same step
                    loop["misses"], result.best_step = from_lead([loop["misses"], result.best_step])
                    result.stopped_early = loop["misses"] >= cfg.patience
                    if result.stopped_early:
                        break
                if result.steps % cfg.checkpoint_every_steps == 0:
                    loop |= {"epoch": epoch, "batch": batch_index + 1}
                    rank_rngs = gather_from_ranks(torch.get_rng_state())  # each rank's dropout stream
                    if lead:  # rank 0 writes the state every rank resumes from
                        state = {
                            "loop": loop,
                            "steps": result.steps,
                            "best": result.best_valid_logloss,
                            "best_step": result.best_step,
                            "history": result.history,
                            "step_losses": result.step_losses,
                            "best_dir": str(out_dir),
                            "epoch_generator": epoch_generator,
                            "best_valid_logits": best_valid_logits,
                            "best_trained": best_trained,
                            "best_trained_logits": best_trained_logits,
                        }
                        save_resume_state(resume, model, optimizer, schedule, state, rank_rngs)
            if result.stopped_early:
                break

    # 7. fit the output layer on the kept step's validation logits (none at step 0), saved
    # beside its weights; the selection decision's interval
    if not lead:
        return result
    kept_logits = None
    if result.best_step > 0:  # the kept weights' logits on all of validation (at hand if selection is all of it)
        kept_logits = (
            best_valid_logits
            if selection.height == valid.height
            else kept_step_logits(settings, out_dir, valid, device)
        )
    calibration = calibrate(settings, train, valid, kept_logits)
    save_calibration(calibration, out_dir)
    if match_encoder is not None:
        save_match_encoder(match_encoder, out_dir)
    result.valid_pctr, result.valid_logits = served_pctr(calibration, kept_logits, valid_priors), kept_logits
    result.valid_clicks = int(selection_labels.sum())
    if best_trained["step"] is not None:
        result.best_trained_step = best_trained["step"]
        result.text_gain = text_gain(settings, train, selection, best_trained_logits)
    print(selection_summary(result))
    decision = {"kept_step": result.best_step, "best_trained_step": result.best_trained_step, "steps": result.steps}
    decision |= {
        "valid_clicks": result.valid_clicks,
        "text_gain": {m: g.as_dict() for m, g in result.text_gain.items()},
        "match_tuned": result.match_tuned,
        "match_gain": {m: g.as_dict() for m, g in result.match_gain.items()},
    }
    (out_dir / SELECTION_FILE).write_text(json.dumps(decision))  # travels with the weights into the registry
    shutil.rmtree(resume, ignore_errors=True)  # finished: a rerun trains afresh
    return result


def selection_sample(valid: pl.DataFrame, cfg: TrainingConfig) -> pl.DataFrame:
    """The validation pairs each step is compared on: all of them, or (training.selection_pairs) a seeded
    sample of at least that many pairs and training.min_valid_clicks clicks, in validation's order."""
    if cfg.selection_pairs is None or cfg.selection_pairs >= valid.height:
        return valid
    shuffled = valid.with_row_index(ROW).sample(fraction=1.0, shuffle=True, seed=cfg.seed)
    clicks = shuffled["is_clicked"].cast(pl.Int64).cum_sum()
    enough = int(clicks.search_sorted(cfg.min_valid_clicks, side="left")) + 1
    return shuffled.head(max(cfg.selection_pairs, enough)).sort(ROW).drop(ROW)


def kept_step_logits(settings: Settings, checkpoint: Path, pairs: pl.DataFrame, device: torch.device) -> np.ndarray:
    """The logits of the weights fine_tune kept (saved in checkpoint) on pairs."""
    model, tokenizer = load_cross_encoder(str(checkpoint), device)
    texts = pairs["user_text"], pairs["ad_text"]
    return predict_logits(model, tokenizer, *texts, settings.model.max_seq_length, settings.training.eval_batch_size)


def base_match_encoder(settings: Settings, device: torch.device) -> MatchEncoder | None:
    """The base model as the semantic match's encoder, before tuning (None: model.calibration does not use it)."""
    if "match" not in settings.model.terms:
        return None
    cfg = settings.model
    batch = settings.training.eval_batch_size
    return load_match_encoder(cfg.base_model, device, cfg.max_seq_length, batch, cfg.match_item_share)


def tune_match(
    settings: Settings,
    encoder: MatchEncoder,
    train: pl.DataFrame,
    pairs: pl.DataFrame,
    valid: pl.DataFrame,
    lead: bool,
    ads: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, bool, dict[str, Interval]]:
    """Tune the match's encoder on the clicks of the pairs fine-tuning trains on, then keep it tuned only if
    step 0 (the priors and the match) scores validation with it better than with the zero-shot encoder beyond
    the noise on one of logloss, AUC and gAUC, and worse beyond the noise on none (match_verdict;
    training.match_guard). On a few hundred clicks the tuning can lose what the encoder knew, or win a small
    validation by chance. Rank 0 embeds validation and decides; every rank gets its decision and its match
    column. Returns validation with the served encoder's match, whether that encoder is the tuned one, and
    the gain per metric (tuned minus zero-shot). With the affinity term (ads: the ad texts of every shown ad), its
    similar counts come from the same encoder as the match, and are compared with it."""
    clicks = match_clicks(pairs, settings.training.match_passed_over, settings.training.seed)
    tune = settings.training.match_epochs > 0 and clicks.height >= 2
    guarded = tune and settings.training.match_guard
    zero_shot = {name: weights.clone() for name, weights in encoder.model.state_dict().items()} if guarded else {}
    bandwidth = settings.model.affinity_bandwidth if ads is not None else None
    zero_shot_valid = with_served_match(valid, encoder, bandwidth, ads) if lead and guarded else None
    losses = tune_match_encoder(encoder, clicks, match_tuning(settings)) if tune else []
    served_valid = with_served_match(valid, encoder, bandwidth, ads) if lead else None
    gain, keep, verdict = {}, tune, "kept the tuned encoder (training.match_guard off)"
    if zero_shot_valid is not None:
        gain = served_gain(settings, train, (served_valid, None), (zero_shot_valid, None))
        keep, verdict = match_verdict(gain)
    (keep,) = from_lead([keep])  # every rank serves the same encoder
    if guarded and not keep:
        encoder.model.load_state_dict(zero_shot)
        served_valid = zero_shot_valid
    if lead and tune:
        gains = ", ".join(f"{metric} {interval}" for metric, interval in gain.items())
        print(
            f"semantic match tuned on {clicks.height} clicks: {len(losses)} steps, loss {losses[0]:.3f} -> "
            f"{losses[-1]:.3f}"
            + (f"; step 0 with it minus zero-shot on validation: {gains}" if gain else "")
            + f"; {verdict}"
        )
    # rank 0's columns on every rank: one embedding, and the same resume state key (resume_dir) everywhere
    names = [MATCH_COLUMN, *(SIMILAR_COLUMNS if ads is not None else ())]
    (columns,) = from_lead([served_valid.select(names).to_dict(as_series=False) if lead else None])
    return valid.with_columns(pl.Series(n, columns[n], dtype=pl.Float64) for n in names), keep, gain


def match_clicks(pairs: pl.DataFrame, passed_over: int, seed: int) -> pl.DataFrame:
    """The clicked pairs the match tunes on, each with up to passed_over ads (PASSED_OVER: ad_id, ad_text) its
    user was shown on the pair's UTC day and did not click, a seeded draw (none for 0, or a day without any)."""
    clicked = pl.col("is_clicked").cast(pl.Boolean)
    if passed_over == 0:
        return pairs.filter(clicked)
    lists = pairs.with_columns(pl.Series("user_day", user_days(pairs, "match_passed_over > 0")))
    passed = (
        lists.filter(~clicked)
        .sample(fraction=1.0, shuffle=True, seed=seed)
        .group_by("user_day")
        .agg(pl.struct("ad_id", "ad_text").head(passed_over).alias(PASSED_OVER))
    )
    clicked_lists = lists.filter(clicked)
    return clicked_lists.join(passed, on="user_day", how="left", maintain_order="left").drop("user_day")


def match_verdict(gain: dict[str, Interval]) -> tuple[bool, str]:
    """Serve the tuned match? Only if better beyond the noise on a metric and worse on none, as a challenger
    must beat a champion (tasks/gates.py); and why, in words."""
    better, worse = beyond_the_noise(gain, better=True), beyond_the_noise(gain, better=False)
    if better and not worse:
        return True, f"kept the tuned encoder (better beyond the noise on {', '.join(better)})"
    listed = f"better beyond the noise on {', '.join(better) or 'nothing'}, worse on {', '.join(worse) or 'nothing'}"
    return False, f"kept the zero-shot encoder (tuned: {listed})"


def match_tuning(settings: Settings) -> MatchTuning:
    cfg = settings.training
    return MatchTuning(
        epochs=cfg.match_epochs,
        batch_size=cfg.match_batch_size,
        learning_rate=cfg.match_learning_rate,
        scale=cfg.match_scale,
        warmup_ratio=cfg.warmup_ratio,
        seed=cfg.seed,
    )


def served_pctr(calibration: Calibration, logits: np.ndarray | None, priors: PairPriors) -> np.ndarray:
    """The output layer's pCTR; logits None: step 0 (a layer fitted without the logit)."""
    return calibration.apply(np.zeros(priors.n, dtype=np.float32) if logits is None else logits, priors)


def cross_fitted_pctr(
    settings: Settings, train: pl.DataFrame, valid: pl.DataFrame, logits: np.ndarray | None
) -> np.ndarray:
    """The served validation pCTR out of sample: validation users are split in CROSS_FIT_FOLDS folds and each
    fold is scored by the output layer fitted on the others. Fitted and scored on the same pairs, any extra
    term (a text logit, even a random one) would lower the logloss a little; across folds, text wins the
    selection only if it predicts users it was not fitted on. logits None: step 0, no logit."""
    keys = valid["user_id"] if "user_id" in valid.columns else pl.Series(range(valid.height))
    folds = (keys.hash(seed=0) % CROSS_FIT_FOLDS).to_numpy()
    labels = valid["is_clicked"].cast(pl.Int8).to_numpy()
    if any(np.unique(labels[folds != fold]).size < 2 for fold in range(CROSS_FIT_FOLDS)):
        # a fold without both classes to fit on (a handful of users or clicks): scored in sample instead
        return served_pctr(calibrate(settings, train, valid, logits), logits, PairPriors.of(valid))
    pctr = np.empty(valid.height, dtype=np.float64)
    for fold in range(CROSS_FIT_FOLDS):
        held = folds == fold
        fitted_on = None if logits is None else logits[~held]
        layer = calibrate(settings, train, valid.filter(pl.Series(~held)), fitted_on)
        scored = valid.filter(pl.Series(held))
        pctr[held] = served_pctr(layer, None if logits is None else logits[held], PairPriors.of(scored))
    return pctr


def text_gain(settings: Settings, train: pl.DataFrame, valid: pl.DataFrame, logits: np.ndarray) -> dict[str, Interval]:
    """What the text term adds on validation: the served score with these logits minus step 0 (no logit)."""
    return served_gain(settings, train, (valid, logits), (valid, None))


def served_gain(settings: Settings, train: pl.DataFrame, model: ServedOn, baseline: ServedOn) -> dict[str, Interval]:
    """The served validation score of model minus baseline (the same pairs, both cross-fitted:
    cross_fitted_pctr), per metric, with paired user-bootstrap intervals."""
    valid = model[0]
    labels = valid["is_clicked"].cast(pl.Int8).to_numpy()
    pctr = {
        "model": cross_fitted_pctr(settings, train, *model),
        "baseline": cross_fitted_pctr(settings, train, *baseline),
    }
    users = (valid["user_id"] if "user_id" in valid.columns else pl.Series(range(valid.height))).cast(pl.String)
    lists = ranking_lists(users, valid["shown_at"]) if "shown_at" in valid.columns else None  # a user's day
    scored = Scored(users.to_numpy(), labels, pctr, lists)
    replicates = settings.promotion.bootstrap_replicates
    return {m: paired_interval([scored], "model", "baseline", m, replicates) for m in SELECTION_METRICS}


def selection_summary(result: TrainResult) -> str:
    """One line: which step was kept and how sure that choice is."""
    kept = f"kept step {result.best_step}" + (
        " (no trained step beat step 0: the model serves its output layer without the logit, slope 0)"
        if result.best_step == 0
        else ""
    )
    if result.best_trained_step is None:
        return f"selection on validation ({result.valid_clicks} clicks): {kept}; no step was trained"
    gains = ", ".join(f"{metric} {gain}" for metric, gain in result.text_gain.items())
    return (
        f"selection on validation ({result.valid_clicks} clicks): best trained step {result.best_trained_step} "
        f"minus step 0 (no logit): {gains} (95% paired user bootstrap); {kept}"
    )


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) without a torch.distributed process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def step_shards(step_order: list[int], rank: int, world: int, accumulation: int) -> list[list[int]]:
    """This rank's micro-batches of one optimizer step: the step's pairs cut into world x accumulation
    contiguous parts of near-equal size, rank r taking parts r*accumulation onwards, so the ranks' shares
    are disjoint and together are the step (contiguous: user-days stay together for the ranking loss)."""
    if world * accumulation == 1:
        return [step_order]
    parts = np.array_split(np.asarray(step_order, dtype=np.int64), world * accumulation)
    return [part.tolist() for part in parts[rank * accumulation : (rank + 1) * accumulation]]


def sum_over_ranks(value: float, device: torch.device) -> float:
    if process_rank()[1] == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item()


def from_lead(values: list) -> list:
    """Rank 0's values on every rank (as they are in a single process)."""
    if process_rank()[1] > 1:
        dist.broadcast_object_list(values, src=0)
    return values


def gather_from_ranks(value: torch.Tensor) -> list[torch.Tensor] | None:
    """Every rank's value, in rank order (None in a single process)."""
    if process_rank()[1] == 1:
        return None
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def user_days(pairs: pl.DataFrame, option: str = "ranking_loss_weight > 0") -> np.ndarray:
    """One id per (user, UTC day) of each pair: the lists a nightly ranking orders (option: the setting that
    needs them, for the error when the pairs lack the columns)."""
    if not {"user_id", "shown_at"} <= set(pairs.columns):
        raise ValueError(f"training.{option} needs the columns user_id and shown_at in the pairs")
    keys = pairs.select("user_id", pl.col("shown_at").dt.date())
    return (
        keys.with_row_index()
        .group_by("user_id", "shown_at", maintain_order=True)
        .agg("index")
        .with_row_index("group")
        .explode("index")
        .sort("index")["group"]
        .to_numpy()
        .astype(np.int64)
    )


def epoch_order(n: int, groups: torch.Tensor | None, generator: torch.Generator) -> list[int]:
    """A random order of the pairs; with groups, whole user-days in random order, so that a batch holds
    pairs of the same user and day for the ranking loss."""
    if groups is None:
        return torch.randperm(n, generator=generator).tolist()
    shuffled = torch.randperm(int(groups.max()) + 1, generator=generator)  # group -> its place
    within = torch.randperm(n, generator=generator)
    keys = shuffled[groups[within]]
    return within[torch.sort(keys, stable=True).indices].tolist()


def pairwise_loss(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean logistic loss of (clicked, not clicked) pairs of the same user-day in the batch: it rewards
    ordering a user's ads by click, which binary cross-entropy alone does not ask for. 0 without such pairs."""
    pairs = (groups[:, None] == groups[None, :]) & (labels[:, None] > labels[None, :])  # (batch, batch)
    if not pairs.any():
        return logits.new_zeros(())
    margins = logits[:, None] - logits[None, :]
    return torch.nn.functional.softplus(-margins[pairs]).mean()


def prior_template(settings: Settings, train: pl.DataFrame) -> Calibration:
    """An output layer holding only what the priors are shrunk with: the training split's click rate and
    model.*_prior_strength (what calibrate fits its weights around)."""
    rate = float(np.clip(train["is_clicked"].cast(pl.Float64).mean(), *PROBABILITY_BOUNDS))
    return Calibration(
        global_log_odds=float(probability_log_odds(rate)),
        ad_prior_strength=settings.model.ad_prior_strength,
        user_prior_strength=settings.model.user_prior_strength,
        affinity_bandwidth=settings.model.affinity_bandwidth,
        affinity_strength=settings.model.affinity_strength,
    )


def user_prior_offsets(settings: Settings, train: pl.DataFrame, pairs: pl.DataFrame) -> np.ndarray:
    """Each pair's user-prior log-odds (training.user_prior_offset; shrunk towards train's click rate), or zeros."""
    if not settings.training.user_prior_offset:
        return np.zeros(pairs.height)
    _require_columns(pairs, USER_PRIOR_COLUMNS, "training.user_prior_offset = true")
    return prior_template(settings, train).user_prior(PairPriors.of(pairs))


def ad_prior_offsets(
    settings: Settings, train: pl.DataFrame, pairs: pl.DataFrame, in_train: bool = False
) -> np.ndarray:
    """Each pair's ad click log-odds from its point-in-time counts (before the request, so never its own
    click), relative to train's click rate, or zeros (training.ad_prior_offset off). A seeded share
    training.ad_prior_offset_dropout of the training pairs (in_train) gets 0, as a cold ad does: the text
    must carry ad quality for those, as it must for cold ads."""
    cfg = settings.training
    if not cfg.ad_prior_offset:
        return np.zeros(pairs.height)
    _require_columns(pairs, AD_PRIOR_COLUMNS, "training.ad_prior_offset = true")
    template = prior_template(settings, train)
    offsets = template.ad_prior(PairPriors.of(pairs)) - template.global_log_odds
    if in_train:
        offsets[np.random.default_rng(cfg.seed).random(pairs.height) < cfg.ad_prior_offset_dropout] = 0.0
    return offsets


def match_offsets(encoder: MatchEncoder, pairs: pl.DataFrame) -> tuple[np.ndarray, float]:
    """training.match_offset: each training pair's semantic match times its weight in a logistic fit of the
    pairs' clicks on it (the training pairs' own: no validation label is read), and that weight."""
    match = encoder.match(pairs["user_text"].to_list(), pairs["ad_text"].to_list())
    labels = pairs["is_clicked"].cast(pl.Int8).to_numpy()
    weight = logistic_fit(labels, match=match)["match_weight"] if labels.min() != labels.max() else 0.0
    return weight * match, weight


def resume_dir(settings: Settings, train: pl.DataFrame, valid: pl.DataFrame, world: int = 1) -> Path:
    """Where a run with exactly this data, model/training config and process count keeps its resume state."""
    digest = hashlib.sha256(settings.model_dump_json(include={"model", "training"}).encode())
    if world > 1:  # a step's pairs depend on the process count
        digest.update(f"world={world}".encode())
    for frame in (train, valid):
        digest.update(frame.hash_rows(seed=0).to_numpy().tobytes())
    return settings.checkpoints_dir / "resume" / digest.hexdigest()[:16]


def save_resume_state(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule,
    state: dict,
    rank_rngs: list[torch.Tensor] | None = None,
) -> None:
    """Weights (safetensors), optimizer, schedule, RNG (each rank's: rank_rngs) and loop position; swapped in
    whole, so a kill while saving leaves the previous state."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    tensors = {
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "epoch_generator": state["epoch_generator"],
        **{name: torch.from_numpy(state[name].copy()) for name in LOGIT_STATES if name in state},
    }
    if rank_rngs is not None:
        tensors["rank_rngs"] = rank_rngs
    torch.save(tensors, tmp / "trainer.pt")
    scalars = {k: v for k, v in state.items() if k not in ("epoch_generator", *LOGIT_STATES)}
    (tmp / "state.json").write_text(json.dumps(scalars))
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)  # left by a kill during the previous swap's clean-up
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_resume_state(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule, rank: int = 0
) -> dict | None:
    """Restore what save_resume_state wrote into model, optimizer, schedule and this rank's RNG; the rest as a dict."""
    if not folder.exists() and folder.with_name(folder.name + ".old").exists():
        folder = folder.with_name(folder.name + ".old")  # killed between the two renames
    if not (folder / "state.json").exists():
        return None
    load_model(model, str(folder / "model.safetensors"))
    tensors = torch.load(folder / "trainer.pt", weights_only=True)  # our own file: tensors and numbers only
    optimizer.load_state_dict(tensors["optimizer"])
    schedule.load_state_dict(tensors["schedule"])
    torch.set_rng_state(tensors["rank_rngs"][rank] if "rank_rngs" in tensors else tensors["torch_rng"])
    state = json.loads((folder / "state.json").read_text())
    return state | {
        "epoch_generator": tensors["epoch_generator"],
        **{name: tensors[name].numpy() for name in LOGIT_STATES if name in tensors},
    }


def calibrate(
    settings: Settings, train: pl.DataFrame, valid: pl.DataFrame, valid_logits: np.ndarray | None
) -> Calibration:
    """The output layer fitted on validation (tasks/output_layer.py): Platt scaling of the logit (none
    without logits: step 0), plus the semantic match and the priors settings.model.calibration names, each pair's
    point-in-time counts shrunk towards train's click rate."""
    method, labels = settings.model.calibration, valid["is_clicked"].cast(pl.Int8).to_numpy()
    if method == "none":  # the raw logit; without one (step 0 kept), the untrained head's is not served either
        return Calibration() if valid_logits is not None else Calibration(slope=0.0)
    if method == "platt":
        return fit_calibration(valid_logits, labels)
    terms = settings.model.terms
    for term, columns in (
        ("user_prior", USER_PRIOR_COLUMNS),
        ("ad_prior", AD_PRIOR_COLUMNS),
        ("match", (MATCH_COLUMN,)),
        ("affinity", SIMILAR_COLUMNS),
    ):
        if term in terms:
            _require_columns(valid, columns, f"model.calibration = {method}")
    return fit_calibration(
        valid_logits,
        labels,
        PairPriors.of(valid),
        prior_template(settings, train),
        with_ad_prior="ad_prior" in terms,
        with_user_prior="user_prior" in terms,
        min_cold_clicks=settings.model.cold_fit_min_clicks,
        with_match="match" in terms,
        with_affinity="affinity" in terms,
        with_new_user_weights=settings.model.new_user_weights,
        cold_reference=cold_reference(train) if "ad_prior" in terms else None,
    )


def cold_ad_pairs(train: pl.DataFrame) -> pl.DataFrame | None:
    """The training split's pairs of cold ads (no impression before the request's day), past the split's first
    day: on logs that start there every ad is cold, new or not. None without the ad counts."""
    if not set(AD_PRIOR_COLUMNS) <= set(train.columns):
        return None
    cold = pl.col("ad_prior_impressions").fill_null(0) <= 0
    if "shown_at" in train.columns:
        cold = cold & (pl.col("shown_at").dt.date() > pl.col("shown_at").min().dt.date())
    return train.filter(cold)


def cold_reference(train: pl.DataFrame) -> tuple[PairPriors, np.ndarray] | None:
    """cold_ad_pairs' priors (no match: the training split's were tuned on) and labels, which choose where cold
    ads' weights are fitted (tasks/output_layer.py cold_fit_rows)."""
    cold = cold_ad_pairs(train)
    if cold is None:
        return None
    counts = cold.select(c for c in PRIOR_COLUMNS if c in cold.columns)
    return PairPriors.of(counts), cold["is_clicked"].cast(pl.Int8).to_numpy()


def _require_columns(pairs: pl.DataFrame, columns: tuple[str, ...], option: str) -> None:
    if not set(columns) <= set(pairs.columns):
        raise ValueError(f"{option} needs the columns {columns} in the pairs")
