"""The cross-encoder: [CLS] user text [SEP] ad text [SEP] -> transformer -> one click logit.

Loading, tokenising and batched inference live here; train.py, evaluate.py, the registered MLflow
model and rerank all use these functions, so a pair is scored the same way everywhere.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import logging as hf_logging

# config attribute names that hold dropout probabilities, across encoder families
DROPOUT_ATTRIBUTES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")
CALIBRATION_FILE = "calibration.json"
# how a saved cross-encoder pools its tokens ({"pooling": "cls" | "mean"}); a folder without it is a plain
# Hugging Face model: a sequence classifier, or a bare encoder that gets a fresh head
POOLING_FILE = "pooling.json"
MEAN_HEAD_FILE = "mean_pooled_head.safetensors"
# a (nearly) unregularised logistic fit: Platt scaling has two parameters and plenty of data
PLATT_INVERSE_REGULARISATION = 1e6
# keeps log-odds finite for ads (or a training split) with all or no clicks
PROBABILITY_BOUNDS = (1e-4, 1 - 1e-4)
# a user's (clicks, impressions) strictly before each request, one entry per pair
UserHistory = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True)
class Calibration:
    """The output layer fitted on validation after fine-tuning (identity by default):

        pCTR = sigmoid(slope * logit + intercept + ad_weight * ad_log_odds[ad] + user_weight * user_log_odds)

    With the ad prior (hybrid text + ID), ad_log_odds holds each training ad's click rate as log-odds,
    shrunk towards the global rate. Ads unseen in training use a second set of weights fitted without
    the ad prior (unseen_*; the ad-ID dropout of this layer), so a cold-start ad is ranked by its text.
    With the user prior, user_log_odds is the user's click rate over the ads shown to them before the
    request, shrunk towards the global rate with user_prior_strength pseudo-impressions.
    """

    slope: float = 1.0
    intercept: float = 0.0
    ad_weight: float = 0.0
    default_ad_log_odds: float = 0.0
    ad_log_odds: dict[str, float] = field(default_factory=dict)
    user_weight: float = 0.0
    user_prior_strength: float = 1.0
    global_log_odds: float = 0.0
    # weights for ads unseen in training; None: the ones above, with default_ad_log_odds as the ad prior
    unseen_slope: float | None = None
    unseen_intercept: float | None = None
    unseen_user_weight: float | None = None

    def ad_prior(self, ad_ids: Sequence[str] | None, n: int) -> np.ndarray:
        """Each pair's ad log-odds, shape (n,); no ad ids means every ad is treated as unseen."""
        if ad_ids is None:
            return np.full(n, self.default_ad_log_odds)
        return np.array([self.ad_log_odds.get(str(a), self.default_ad_log_odds) for a in ad_ids], dtype=np.float64)

    def user_prior(self, history: UserHistory | None, n: int) -> np.ndarray:
        """Each pair's user log-odds, shape (n,); no history means users with no impressions yet."""
        if history is None:
            return np.full(n, self.global_log_odds)
        clicks, impressions = (np.asarray(h, dtype=np.float64) for h in history)
        rate = 1.0 / (1.0 + np.exp(-self.global_log_odds))
        return probability_log_odds(
            (clicks + self.user_prior_strength * rate) / (impressions + self.user_prior_strength)
        )

    def terms(self, ad_ids: Sequence[str] | None, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per pair: the logit's slope, the offset (intercept + ad prior term) and the user prior's weight."""
        slope, offset = np.full(n, self.slope), self.intercept + self.ad_weight * self.ad_prior(ad_ids, n)
        user_weight = np.full(n, self.user_weight)
        if self.unseen_slope is not None:
            unseen = np.array(
                [True] * n if ad_ids is None else [str(a) not in self.ad_log_odds for a in ad_ids], dtype=bool
            )
            slope[unseen], offset[unseen], user_weight[unseen] = (
                self.unseen_slope,
                self.unseen_intercept,
                self.unseen_user_weight or 0.0,
            )
        return slope, offset, user_weight

    def log_odds(
        self, logits: np.ndarray, ad_ids: Sequence[str] | None = None, history: UserHistory | None = None
    ) -> np.ndarray:
        slope, offset, user_weight = self.terms(ad_ids, len(logits))
        z = slope * logits.astype(np.float64) + offset
        if self.user_weight or self.unseen_user_weight:
            z += user_weight * self.user_prior(history, len(logits))
        return z

    def contributions(self, logit: float, ad_id: str | None, history: UserHistory | None) -> dict[str, float]:
        """One pair's log-odds, term by term: text (slope x logit), intercept, ad prior, user prior; their
        sum is log_odds() of the pair."""
        ids = None if ad_id is None else [ad_id]
        slope, offset, user_weight = (float(t[0]) for t in self.terms(ids, 1))
        seen = ad_id is not None and str(ad_id) in self.ad_log_odds
        intercept = self.intercept if seen or self.unseen_slope is None else float(self.unseen_intercept)
        uses_user_prior = bool(self.user_weight or self.unseen_user_weight)
        return {
            "text": slope * float(logit),
            "intercept": intercept,
            "ad_prior": offset - intercept,
            "user_prior": user_weight * float(self.user_prior(history, 1)[0]) if uses_user_prior else 0.0,
        }

    def apply(
        self, logits: np.ndarray, ad_ids: Sequence[str] | None = None, history: UserHistory | None = None
    ) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.log_odds(logits, ad_ids, history)))


def probability_log_odds(p: np.ndarray | float) -> np.ndarray:
    """log(p / (1 - p)), with p kept inside PROBABILITY_BOUNDS so that all-or-no clicks stay finite."""
    p = np.clip(p, *PROBABILITY_BOUNDS)
    return np.log(p / (1 - p))


def ad_click_log_odds(ad_ids: Sequence[str], clicks: np.ndarray, strength: float) -> tuple[dict[str, float], float]:
    """Per-ad click log-odds with `strength` pseudo-impressions at the global rate, and the global log-odds."""
    ads, index = np.unique(np.array([str(a) for a in ad_ids]), return_inverse=True)
    rate = float(np.clip(clicks.mean(), *PROBABILITY_BOUNDS))
    shrunk = (np.bincount(index, weights=clicks) + strength * rate) / (np.bincount(index) + strength)
    return dict(zip(ads.tolist(), probability_log_odds(shrunk).tolist(), strict=True)), float(
        probability_log_odds(rate)
    )


def fit_calibration(
    logits: np.ndarray,
    labels: np.ndarray,
    ad_ids: Sequence[str] | None = None,
    prior: Calibration | None = None,
    history: UserHistory | None = None,
) -> Calibration:
    """Fit the output layer on held-out logits (validation), never on training data.

    Platt scaling (slope, intercept) alone, or with the weights of the priors `prior` carries: the ad
    prior when it has ad_log_odds from the training split, the user prior when `history` is given.
    With the ad prior, the weights for unseen ads are fitted on the same pairs without it.
    """
    if labels.min() == labels.max():
        return Calibration()
    if prior is None:
        return Calibration(**_logistic_fit(logits, labels))
    user = prior.user_prior(history, len(logits)) if history is not None else None
    without_ad = _logistic_fit(logits, labels, user=user)
    if not prior.ad_log_odds:
        return replace(prior, **without_ad)
    with_ad = _logistic_fit(logits, labels, ad=prior.ad_prior(ad_ids, len(logits)), user=user)
    unseen = {f"unseen_{name}": value for name, value in without_ad.items()}
    return replace(prior, **with_ad, **unseen)


def _logistic_fit(
    logits: np.ndarray, labels: np.ndarray, ad: np.ndarray | None = None, user: np.ndarray | None = None
) -> dict[str, float]:
    """slope, intercept and the weights of the given priors, by a (nearly) unregularised logistic fit."""
    from sklearn.linear_model import LogisticRegression

    features = {"slope": logits, "ad_weight": ad, "user_weight": user}
    features = {name: np.asarray(f, dtype=np.float64) for name, f in features.items() if f is not None}
    x = np.column_stack(list(features.values()))
    # standardised, so that the solver's tolerance means the same at any logit scale (a fresh head's logits
    # can spread by 1e-4), then mapped back to the features' own units
    center, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    fit = LogisticRegression(C=PLATT_INVERSE_REGULARISATION).fit((x - center) / scale, labels)
    coef = fit.coef_[0] / scale
    intercept = float(fit.intercept_[0] - coef @ center)
    return dict(zip(features, coef.tolist(), strict=True)) | {"intercept": intercept}


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


class MeanPooledClassifier(torch.nn.Module):
    """encoder -> mean of the token vectors (padding masked out) -> dropout -> linear -> one click logit.

    Sentence-embedding models such as all-MiniLM-L6-v2 were trained to be read by mean pooling; the
    [CLS] pooler of a sequence classifier is a layer they never trained.
    """

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder, self.config = encoder, encoder.config
        self.dropout = torch.nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1))
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, 1)
        torch.nn.init.normal_(self.classifier.weight, std=getattr(encoder.config, "initializer_range", 0.02))
        torch.nn.init.zeros_(self.classifier.bias)

    @property
    def base_model(self) -> torch.nn.Module:
        return self.encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs) -> SequenceClassifierOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (batch, hidden)
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(pooled)))  # (batch, 1)

    def save_pretrained(self, folder: str | Path, **kwargs) -> None:
        self.encoder.save_pretrained(folder, safe_serialization=True)
        save_file({k: v.contiguous() for k, v in self.classifier.state_dict().items()}, Path(folder) / MEAN_HEAD_FILE)


def saved_pooling(path: str | Path, default: str = "cls") -> str:
    """How the model saved at path pools its tokens; `default` for a folder adrank did not save."""
    file = Path(path) / POOLING_FILE
    return json.loads(file.read_text())["pooling"] if file.exists() else default


def load_cross_encoder(
    path: str, device: torch.device, dropout: float | None = None, pooling: str = "cls"
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A one-logit cross-encoder (a fresh head on a bare encoder) and its tokenizer.

    `pooling` applies to a folder that does not say how it pools (a base model); a model adrank saved
    is loaded the way it was trained. Weights load from safetensors only: never from pickled checkpoints.
    """
    is_base_model = not (Path(path) / POOLING_FILE).exists()
    pooling = saved_pooling(path, pooling)
    config = AutoConfig.from_pretrained(path, num_labels=1)
    if dropout is not None:
        for name in DROPOUT_ATTRIBUTES:
            if hasattr(config, name):
                setattr(config, name, dropout)
    with quiet_transformers():  # the fresh head of a base model is expected: said once below instead
        if pooling == "mean":
            model = MeanPooledClassifier(AutoModel.from_pretrained(path, config=config, use_safetensors=True))
            if (Path(path) / MEAN_HEAD_FILE).exists():
                model.classifier.load_state_dict(load_file(Path(path) / MEAN_HEAD_FILE))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, config=config, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if is_base_model:
        name = f"{Path(path).parent.name}/{Path(path).name}"
        print(f"{name}: base encoder loaded with a fresh one-logit head ({pooling} pooling), as expected")
    return model.to(device), tokenizer


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' load reports (a base model's fresh head listed as MISSING weights) and its loading and
    saving bars, once per model load or checkpoint save, are not the user's concern: errors only."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def save_cross_encoder(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Weights (safetensors), tokenizer and how the model pools, so that load_cross_encoder reads it back as is."""
    with quiet_transformers():
        model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    pooling = "mean" if isinstance(model, MeanPooledClassifier) else "cls"
    (Path(folder) / POOLING_FILE).write_text(json.dumps({"pooling": pooling}))


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase, user_texts: Sequence[str], ad_texts: Sequence[str], max_length: int
) -> list[dict[str, list[int]]]:
    """One unpadded encoding per pair, truncating the longer text first."""
    encoded = tokenizer(
        list(user_texts), list(ad_texts), truncation="longest_first", max_length=max_length, padding=False
    )
    return _per_example(encoded)


def _per_example(encoded) -> list[dict[str, list[int]]]:
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
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Click logits, shape (pairs,), in input order. on_batch(pairs) is called after each batch (progress)."""
    if len(user_texts) == 0:
        return np.empty(0, dtype=np.float32)
    encodings = tokenize_pairs(tokenizer, user_texts, ad_texts, max_length)
    forward = lambda batch: model(**batch).logits.squeeze(-1)  # noqa: E731
    return _infer(model, tokenizer, encodings, batch_size, (), forward, on_batch)


def embed_texts(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, batch_size: int
) -> np.ndarray:
    """Mean-pooled last hidden states of the model's encoder, one row per text: shape (texts, hidden).

    Identical texts are encoded once.
    """
    if len(texts) == 0:
        return np.empty((0, model.config.hidden_size), dtype=np.float32)
    unique, inverse = np.unique(np.asarray(list(texts), dtype=object).astype(str), return_inverse=True)

    def mean_pooled(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model.base_model(**batch).last_hidden_state.float()  # (batch, seq, hidden)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)

    encodings = _tokenize_texts(tokenizer, unique, max_length)
    return _infer(model, tokenizer, encodings, batch_size, (model.config.hidden_size,), mean_pooled)[inverse]


def _infer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    encodings: Sequence[dict[str, list[int]]],
    batch_size: int,
    row_shape: tuple[int, ...],
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """forward() over length-sorted, dynamically padded batches in eval mode: (encodings, *row_shape), in order."""
    device = next(model.parameters()).device
    out = np.empty((len(encodings), *row_shape), dtype=np.float32)
    was_training = model.training
    model.eval()
    with torch.inference_mode(), _autocast(device):
        for index in length_sorted_batches(encodings, batch_size):
            out[index] = forward(collate(tokenizer, [encodings[i] for i in index], device)).float().cpu().numpy()
            if on_batch is not None:
                on_batch(len(index))
    model.train(was_training)
    return out


def _tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> list[dict]:
    return _per_example(tokenizer(list(texts), truncation=True, max_length=max_length, padding=False))


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A CPU copy with int8 dynamic quantisation of the linear layers (int8 weights, activations per batch)."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model.cpu(), {torch.nn.Linear}, dtype=torch.qint8, inplace=False)


def predict_ctr(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    user_texts: Sequence[str],
    ad_texts: Sequence[str],
    max_length: int,
    batch_size: int,
    calibration: Calibration = Calibration(),
    ad_ids: Sequence[str] | None = None,
    history: UserHistory | None = None,
) -> np.ndarray:
    """Predicted click-through rates in (0, 1), shape (pairs,). Without ad_ids every ad counts as unseen,
    without history every user as one with no impressions yet."""
    logits = predict_logits(model, tokenizer, user_texts, ad_texts, max_length, batch_size)
    return calibration.apply(logits, ad_ids, history)
