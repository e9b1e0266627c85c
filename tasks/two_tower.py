"""Stage 1 of the two-stage rerank: a two-tower model distilled from the fine-tuned cross-encoder.

Each user text and each ad text is encoded once by the cross-encoder's own encoder (mean-pooled, see
model.embed_texts). Two linear projections P (users) and Q (ads) are regressed so that

    P(user) . Q(ad) + biases  ~  cross_encoder_logit(user, ad)

on random (user, ad) pairs of the training split. At rerank (tasks/score.py) each ad's score is
anchored exactly: the cross-encoder scores every ad against a few fixed reference users (saved here),
and the two-tower only predicts how a user differs from them:

    stage1(user, ad) = slope(ad) * [anchor(ad) + (P(user) - mean P(reference users)) . Q(ad)]
                       + the output layer's other terms (tasks/model.py: Calibration.terms)

so the ad effects that dominate a CTR model come from the cross-encoder itself, at a cost of
reference_users x ads passes a night.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import spearmanr

from tasks.model import (
    embed_texts,
    load_cross_encoder,
    pick_device,
    predict_logits,
    seed_everything,
)

if TYPE_CHECKING:  # only a type here: the served model imports this module without adrank's config
    from tasks.config import Settings

WEIGHTS_FILE, CONFIG_FILE = "two_tower.safetensors", "two_tower.json"
HOLDOUT_SHARE = 0.2  # of distillation users, kept out of training to measure fidelity
LOGIT_SCALE = 1.0  # the towers regress the cross-encoder's raw logit


class TwoTower(torch.nn.Module):
    def __init__(
        self,
        hidden_size: int,
        dim: int,
        reference_user_texts: list[str] | None = None,
        logit_scale: float | None = LOGIT_SCALE,
    ):
        super().__init__()
        self.reference_user_texts = list(reference_user_texts or [])
        # what the towers' scores are in logit units (None: versions distilled on the calibrated slope * logit)
        self.logit_scale = logit_scale
        self.user = torch.nn.Linear(hidden_size, dim)
        self.ad = torch.nn.Linear(hidden_size, dim)
        # a user's bias does not change their ranking, but fitting it keeps the rest for what does
        self.user_bias = torch.nn.Linear(hidden_size, 1)
        self.ad_bias = torch.nn.Linear(hidden_size, 1)

    def forward(self, user_embeddings: torch.Tensor, ad_embeddings: torch.Tensor) -> torch.Tensor:
        """Row-wise scores of aligned (user, ad) rows: shape (pairs,)."""
        interaction = (self.user(user_embeddings) * self.ad(ad_embeddings)).sum(dim=1)
        return interaction + self.user_bias(user_embeddings).squeeze(-1) + self.ad_bias(ad_embeddings).squeeze(-1)


@dataclass(frozen=True)
class DistillResult:
    pairs: int
    holdout_mse: float
    holdout_spearman: float  # rank correlation with the cross-encoder on held-out users' pairs
    # the same within each held-out user, averaged: what stage 1 is for (an ad-only score can match the
    # pooled correlation where ads differ more than users, and still order no user's ads as stage 2 would)
    holdout_user_spearman: float


def load_two_tower(checkpoint: str | Path) -> TwoTower | None:
    """The stage-1 model saved beside a cross-encoder, or None for a checkpoint without one."""
    config_path = Path(checkpoint) / CONFIG_FILE
    if not config_path.exists():
        return None
    tower = TwoTower(**{"logit_scale": None} | json.loads(config_path.read_text()))
    tower.load_state_dict(load_file(Path(checkpoint) / WEIGHTS_FILE))
    return tower.eval()


def distill_two_tower(settings: Settings, checkpoint: Path, train_path: Path) -> DistillResult:
    """Fit the two-tower to the cross-encoder's scores of random (user, ad) pairs from the training split.

    Saves two_tower.safetensors + two_tower.json into the checkpoint folder.
    """
    cfg, max_length, batch_size = settings.stage1, settings.model.max_seq_length, settings.training.eval_batch_size
    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    # 1. a sample of users x random ads, scored by the teacher
    train = pl.read_parquet(train_path, columns=["user_text", "ad_text"])
    users = train["user_text"].unique().sort().to_numpy()
    users = rng.choice(users, size=min(cfg.distill_users, len(users)), replace=False)
    ads = train["ad_text"].unique().sort().to_numpy()
    user_index = np.repeat(np.arange(len(users)), cfg.distill_ads_per_user)
    ad_index = rng.integers(0, len(ads), size=len(user_index))
    from tasks.progress import StageProgress  # here, not at the top: the served model imports this module

    model, tokenizer = load_cross_encoder(str(checkpoint), pick_device())
    with StageProgress("distill_two_tower: teacher scores", len(user_index), "pairs") as bar:
        logits = predict_logits(model, tokenizer, users[user_index], ads[ad_index], max_length, batch_size, bar.advance)
    targets = torch.tensor(logits, dtype=torch.float32)

    # 2. each text encoded once
    user_embeddings = torch.tensor(embed_texts(model, tokenizer, users, max_length, batch_size))
    ad_embeddings = torch.tensor(embed_texts(model, tokenizer, ads, max_length, batch_size))

    # 3. full-batch regression on the training users; held-out users measure fidelity
    held_out = torch.tensor(np.isin(user_index, np.arange(round(HOLDOUT_SHARE * len(users)))))
    tower = TwoTower(model.config.hidden_size, cfg.dim)
    optimizer = torch.optim.AdamW(tower.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    u, a = user_embeddings[user_index], ad_embeddings[ad_index]
    for _ in range(cfg.epochs):
        loss = torch.nn.functional.mse_loss(tower(u[~held_out], a[~held_out]), targets[~held_out])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # 4. save beside the cross-encoder, with the reference users that anchor each ad's score at rerank
    tower.eval()
    tower.reference_user_texts = rng.choice(users, size=min(cfg.reference_users, len(users)), replace=False).tolist()
    save_file(tower.state_dict(), Path(checkpoint) / WEIGHTS_FILE)
    config = {
        "hidden_size": model.config.hidden_size,
        "dim": cfg.dim,
        "reference_user_texts": tower.reference_user_texts,
        "logit_scale": tower.logit_scale,
    }
    (Path(checkpoint) / CONFIG_FILE).write_text(json.dumps(config))
    with torch.inference_mode():
        predicted = tower(u[held_out], a[held_out]).numpy()
    expected, held_out_users = targets[held_out].numpy(), user_index[held_out.numpy()]
    per_user = [
        _spearman(predicted[held_out_users == i], expected[held_out_users == i]) for i in np.unique(held_out_users)
    ]
    return DistillResult(
        pairs=len(targets),
        holdout_mse=float(np.mean((predicted - expected) ** 2)) if len(expected) else float("nan"),
        holdout_spearman=_spearman(predicted, expected),
        holdout_user_spearman=float(np.nanmean(per_user)) if np.isfinite(per_user).any() else float("nan"),
    )


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """NaN where undefined: fewer than two pairs, or a constant side."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)
