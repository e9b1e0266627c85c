"""The cross-encoder: [CLS] user text [SEP] ad text [SEP] -> transformer -> one click logit.

Loading, tokenising and batched inference live here; train.py, evaluate.py, the registered MLflow
model and rerank all use these functions, so a pair is scored the same way everywhere.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

# config attribute names that hold dropout probabilities, across encoder families
DROPOUT_ATTRIBUTES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")
CALIBRATION_FILE = "calibration.json"
# a (nearly) unregularised logistic fit: Platt scaling has two parameters and plenty of data
PLATT_INVERSE_REGULARISATION = 1e6


@dataclass(frozen=True)
class Calibration:
    """Platt scaling of the click logit: pCTR = sigmoid(slope * logit + intercept). Identity by default."""

    slope: float = 1.0
    intercept: float = 0.0

    def apply(self, logits: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.slope * logits.astype(np.float64) + self.intercept)))


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> Calibration:
    """Fit slope and intercept on held-out logits (validation), never on training data."""
    from sklearn.linear_model import LogisticRegression

    if labels.min() == labels.max():
        return Calibration()
    fit = LogisticRegression(C=PLATT_INVERSE_REGULARISATION).fit(logits.reshape(-1, 1), labels)
    return Calibration(float(fit.coef_[0, 0]), float(fit.intercept_[0]))


def save_calibration(calibration: Calibration, model_dir: Path) -> None:
    (Path(model_dir) / CALIBRATION_FILE).write_text(json.dumps(asdict(calibration)))


def load_calibration(model_dir: str | Path) -> Calibration:
    """The calibration saved beside a fine-tuned model; identity for a model without one."""
    path = Path(model_dir) / CALIBRATION_FILE
    return Calibration(**json.loads(path.read_text())) if path.exists() else Calibration()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch: fresh heads, dropout and data order repeat run to run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    """CUDA when present; on CPU use every core for intra-op parallelism."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(os.cpu_count() or 1)
    return torch.device("cpu")


def load_cross_encoder(
    path: str, device: torch.device, dropout: float | None = None
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A sequence-classification model with one output (a fresh head on a bare encoder) and its tokenizer.

    Weights load from safetensors only: never from pickled checkpoints.
    """
    config = AutoConfig.from_pretrained(path, num_labels=1)
    if dropout is not None:
        for name in DROPOUT_ATTRIBUTES:
            if hasattr(config, name):
                setattr(config, name, dropout)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device), tokenizer


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase, user_texts: Sequence[str], ad_texts: Sequence[str], max_length: int
) -> list[dict[str, list[int]]]:
    """One unpadded encoding per pair, truncating the longer text first."""
    encoded = tokenizer(
        list(user_texts), list(ad_texts), truncation="longest_first", max_length=max_length, padding=False
    )
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in encoded]
    return [{k: encoded[k][i] for k in keys} for i in range(len(encoded["input_ids"]))]


def collate(
    tokenizer: PreTrainedTokenizerBase, encodings: Sequence[dict[str, list[int]]], device: torch.device
) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest pair (dynamic padding): tensors of shape (batch, seq_len)."""
    batch = tokenizer.pad(list(encodings), padding="longest", return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


def length_sorted_batches(encodings: Sequence[dict[str, list[int]]], batch_size: int) -> Iterator[np.ndarray]:
    """Index batches of similar-length pairs, so padding wastes little compute."""
    order = np.argsort([len(e["input_ids"]) for e in encodings], kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def predict_logits(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    user_texts: Sequence[str],
    ad_texts: Sequence[str],
    max_length: int,
    batch_size: int,
) -> np.ndarray:
    """Click logits, shape (pairs,), in input order."""
    device = next(model.parameters()).device
    encodings = tokenize_pairs(tokenizer, user_texts, ad_texts, max_length)
    logits = np.empty(len(encodings), dtype=np.float32)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    was_training = model.training
    model.eval()
    with torch.inference_mode(), autocast:
        for index in length_sorted_batches(encodings, batch_size):
            batch = collate(tokenizer, [encodings[i] for i in index], device)
            logits[index] = model(**batch).logits.squeeze(-1).float().cpu().numpy()
    model.train(was_training)
    return logits


def predict_ctr(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    user_texts: Sequence[str],
    ad_texts: Sequence[str],
    max_length: int,
    batch_size: int,
    calibration: Calibration = Calibration(),
) -> np.ndarray:
    """Predicted click-through rates in (0, 1), shape (pairs,)."""
    return calibration.apply(predict_logits(model, tokenizer, user_texts, ad_texts, max_length, batch_size))
