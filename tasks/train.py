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

from tasks.config import Settings
from tasks.metrics import logloss, roc_auc
from tasks.model import (
    PROBABILITY_BOUNDS,
    Calibration,
    ad_click_log_odds,
    collate,
    fit_calibration,
    load_cross_encoder,
    pick_device,
    predict_logits,
    probability_log_odds,
    save_calibration,
    save_cross_encoder,
    seed_everything,
    tokenize_pairs,
)
from tasks.pairs import USER_PRIOR_COLUMNS, user_history
from tasks.progress import StageProgress

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


@dataclass
class TrainResult:
    checkpoint: Path
    best_valid_logloss: float  # of the served score: the output layer fitted on the kept step's logits
    steps: int
    stopped_early: bool
    # one row per validation: step, epoch, train_loss, valid_logloss, valid_auc (served), valid_raw_logloss
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int = 0  # the step whose weights were kept (0: the untrained model)
    step_losses: list[float] = field(default_factory=list)  # training loss of each optimizer step, in order
    valid_pctr: np.ndarray | None = None  # (valid pairs,): the served pCTR of the kept step on validation


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
    each validation's logits), save the best model and its output layer to out_dir.

    Under torchrun (a process group set up by tasks/train_worker.py) each rank trains on its share of every
    step's pairs through DistributedDataParallel; rank 0 alone validates, decides, saves and calibrates, and
    its result is the run's. on_step(epoch, the pair indices this rank trained on, model) runs after each
    optimizer step (tests)."""
    cfg, max_length = settings.training, settings.model.max_seq_length
    rank, world = process_rank()
    lead = rank == 0  # validation, checkpoints, resume state, calibration and printing happen here

    # 1. seed, device, base model with a fresh one-logit head (DDP: every rank starts from rank 0's weights)
    seed_everything(cfg.seed)
    device = pick_device()
    if world > 1 and device.type == "cpu":  # the node's cores are shared by its ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    model, tokenizer = load_cross_encoder(
        settings.model.base_model, device, dropout=settings.model.dropout, pooling=settings.model.pooling
    )
    freeze_lower_layers(model, cfg.trainable_layers)
    trainer = DistributedDataParallel(model) if world > 1 else model  # forward passes; model is the module itself

    # 2. data: tokenise once; batches are padded per batch
    present = pl.read_parquet_schema(train_path)
    wanted = ("ad_id", "user_id", "shown_at", "user_text", "ad_text", "is_clicked", *USER_PRIOR_COLUMNS)
    columns = [c for c in wanted if c in present]
    train = pl.read_parquet(train_path, columns=columns)
    valid = pl.read_parquet(valid_path)  # with the user prior counts, for the output layer
    tuned = (
        train
        if cfg.sample_pairs is None or cfg.sample_pairs >= train.height
        else train.sample(cfg.sample_pairs, seed=cfg.seed)
    )
    encodings = tokenize_pairs(tokenizer, tuned["user_text"], tuned["ad_text"], max_length)
    labels = torch.tensor(tuned["is_clicked"].cast(pl.Float32).to_numpy())
    valid_labels = valid["is_clicked"].cast(pl.Int8).to_numpy()
    offsets = user_prior_offsets(settings, train, tuned) + ad_prior_offsets(settings, train, tuned, in_train=True)
    offsets = torch.tensor(offsets, dtype=torch.float32)
    groups = torch.tensor(user_days(tuned)) if cfg.ranking_loss_weight > 0 else None  # (pairs,) user-day ids
    valid_offsets = user_prior_offsets(settings, train, valid) + ad_prior_offsets(settings, train, valid)

    # 3. optimizer: AdamW, no weight decay on biases and norms; linear warm-up then linear decay.
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

    def validate(step: int, epoch: float, train_loss: float) -> tuple[float, np.ndarray]:
        """Score validation as it will be served: the output layer fitted on these logits, then logloss
        and AUC of its pCTR (a raw logloss also punishes base-rate shifts that the output layer removes)."""
        logits = predict_logits(model, tokenizer, valid["user_text"], valid["ad_text"], max_length, cfg.eval_batch_size)
        served = calibrate(settings, train, valid, logits).apply(logits, valid["ad_id"].to_list(), user_history(valid))
        row = {
            "step": step,
            "epoch": epoch,
            "train_loss": train_loss,
            "valid_logloss": logloss(valid_labels, served),
            "valid_auc": roc_auc(valid_labels, served),
            "valid_raw_logloss": logloss(valid_labels, Calibration().apply(logits + valid_offsets)),
        }
        result.history.append(row)
        print(
            f"step {step:>6} epoch {epoch:5.2f} train_loss {train_loss:.4f} valid_logloss {row['valid_logloss']:.4f} "
            f"valid_auc {row['valid_auc']:.4f} (served score; raw logloss {row['valid_raw_logloss']:.4f})"
        )
        return row["valid_logloss"], logits

    def save_if_best(valid_loss: float, logits: np.ndarray) -> bool:
        if valid_loss < result.best_valid_logloss:
            result.best_valid_logloss, result.best_step = valid_loss, result.steps
            best_valid_logits[:] = logits  # (valid pairs,): what the calibration is fitted on
            save_cross_encoder(model, tokenizer, out_dir)
            return True
        return False

    # 4. the untrained model is the first candidate, unless a killed run with this data and config left a state
    result = TrainResult(checkpoint=out_dir, best_valid_logloss=math.inf, steps=0, stopped_early=False)
    best_valid_logits = np.zeros(valid.height, dtype=np.float32)
    generator = torch.Generator().manual_seed(cfg.seed)
    resume = resume_dir(settings, tuned, valid, world)
    loop = {"epoch": 0, "batch": 0, "misses": 0, "running_loss": 0.0, "running_n": 0}
    if (state := load_resume_state(resume, model, optimizer, schedule, rank)) is not None:
        loop, best_valid_logits[:] = state["loop"], state["best_valid_logits"]
        result.steps, result.best_valid_logloss, result.history = state["steps"], state["best"], state["history"]
        result.best_step, result.step_losses = state.get("best_step", 0), state.get("step_losses", [])
        generator.set_state(state["epoch_generator"])
        if lead and Path(state["best_dir"]) != out_dir:
            shutil.copytree(state["best_dir"], out_dir, dirs_exist_ok=True)
        print(f"resuming from step {result.steps} ({resume})")
    elif lead:
        save_if_best(*validate(step=0, epoch=0.0, train_loss=math.nan))

    # 5. train; validate each epoch (and every eval_every_steps); stop after `patience` misses
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
                        }
                        save_resume_state(resume, model, optimizer, schedule, state, rank_rngs)
            if result.stopped_early:
                break

    # 6. fit the output layer on the best model's validation logits, saved beside its weights
    if not lead:
        return result
    calibration = calibrate(settings, train, valid, best_valid_logits)
    save_calibration(calibration, out_dir)
    result.valid_pctr = calibration.apply(best_valid_logits, valid["ad_id"].to_list(), user_history(valid))
    shutil.rmtree(resume, ignore_errors=True)  # finished: a rerun trains afresh
    return result


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


def user_days(pairs: pl.DataFrame) -> np.ndarray:
    """One id per (user, UTC day) of each pair: the lists a nightly ranking orders."""
    if not {"user_id", "shown_at"} <= set(pairs.columns):
        raise ValueError("training.ranking_loss_weight > 0 needs the columns user_id and shown_at in the pairs")
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


def user_prior_offsets(settings: Settings, train: pl.DataFrame, pairs: pl.DataFrame) -> np.ndarray:
    """Each pair's user-prior log-odds (training.user_prior_offset; shrunk towards train's click rate), or zeros."""
    if not settings.training.user_prior_offset:
        return np.zeros(pairs.height)
    history = _required_user_history(pairs, "training.user_prior_offset = true")
    global_log_odds = float(probability_log_odds(train["is_clicked"].mean()))
    prior = Calibration(global_log_odds=global_log_odds, user_prior_strength=settings.model.user_prior_strength)
    return prior.user_prior(history, pairs.height)


def ad_prior_offsets(
    settings: Settings, train: pl.DataFrame, pairs: pl.DataFrame, in_train: bool = False
) -> np.ndarray:
    """Each pair's ad click log-odds relative to the global rate, from the training split (shrunk by
    model.ad_prior_strength), or zeros (training.ad_prior_offset off). For training pairs (in_train) the
    pair's own impression is left out of its ad's counts (no label leak), and a seeded share
    training.ad_prior_offset_dropout of them gets 0, as an ad unseen in training does: the text must
    carry ad quality for those, as it must for cold-start ads."""
    cfg = settings.training
    if not cfg.ad_prior_offset:
        return np.zeros(pairs.height)
    clicks = train["is_clicked"].cast(pl.Float64)
    rate = float(np.clip(clicks.mean(), *PROBABILITY_BOUNDS))
    counts = train.group_by("ad_id").agg(pl.len().alias("n"), pl.col("is_clicked").cast(pl.Float64).sum().alias("c"))
    joined = pairs.select("ad_id", "is_clicked").join(counts, on="ad_id", how="left", maintain_order="left")
    n, c = joined["n"].fill_null(0).to_numpy().astype(float), joined["c"].fill_null(0).to_numpy()
    if in_train:
        n, c = n - 1, c - joined["is_clicked"].cast(pl.Float64).to_numpy()
    strength = settings.model.ad_prior_strength
    offsets = probability_log_odds((c + strength * rate) / (n + strength)) - probability_log_odds(rate)
    if in_train:
        offsets[np.random.default_rng(cfg.seed).random(pairs.height) < cfg.ad_prior_offset_dropout] = 0.0
    return offsets


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
        "best_valid_logits": torch.from_numpy(state["best_valid_logits"].copy()),
    }
    if rank_rngs is not None:
        tensors["rank_rngs"] = rank_rngs
    torch.save(tensors, tmp / "trainer.pt")
    scalars = {k: v for k, v in state.items() if k not in ("epoch_generator", "best_valid_logits")}
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
        "best_valid_logits": tensors["best_valid_logits"].numpy(),
    }


def calibrate(settings: Settings, train: pl.DataFrame, valid: pl.DataFrame, valid_logits: np.ndarray) -> Calibration:
    """Platt scaling on validation, plus the priors settings.model.calibration names: each ad's click
    log-odds from the training split; each validation user's clicks and impressions before the pair."""
    method, labels = settings.model.calibration, valid["is_clicked"].cast(pl.Int8).to_numpy()
    if method == "none":
        return Calibration()
    if method == "platt":
        return fit_calibration(valid_logits, labels)
    clicks = train["is_clicked"].cast(pl.Float64).to_numpy()
    log_odds, global_log_odds = ad_click_log_odds(train["ad_id"].to_list(), clicks, settings.model.ad_prior_strength)
    prior = Calibration(
        ad_log_odds=log_odds,
        default_ad_log_odds=global_log_odds,
        global_log_odds=global_log_odds,
        user_prior_strength=settings.model.user_prior_strength,
    )
    history = _required_user_history(valid, f"model.calibration = {method}") if method.endswith("+user_prior") else None
    return fit_calibration(valid_logits, labels, valid["ad_id"].to_list(), prior, history)


def _required_user_history(pairs: pl.DataFrame, option: str) -> tuple[np.ndarray, np.ndarray]:
    history = user_history(pairs)
    if history is None:
        raise ValueError(f"{option} needs the columns {USER_PRIOR_COLUMNS} in the pairs")
    return history
