"""The cross-encoder: [CLS] user text [SEP] ad text [SEP] -> transformer -> one click logit.

Loading, tokenising and batched inference live here (the output layer that turns logits into pCTR in
tasks/output_layer.py); train.py, evaluate.py, the registered MLflow model and rerank all use these
functions, so a pair is scored the same way everywhere.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
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

# load_calibration: the served code of versions registered before tasks/output_layer.py imports it from here
from tasks.output_layer import Calibration, PairPriors, load_calibration  # noqa: F401

# config attribute names that hold dropout probabilities, across encoder families
DROPOUT_ATTRIBUTES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")
# how a saved cross-encoder pools its tokens ({"pooling": "cls" | "mean"}); a folder without it is a plain
# Hugging Face model: a sequence classifier, or a bare encoder that gets a fresh head
POOLING_FILE = "pooling.json"
MEAN_HEAD_FILE = "mean_pooled_head.safetensors"


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
        pooled = mean_pooled(hidden, attention_mask)  # (batch, hidden)
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(pooled)))  # (batch, 1)

    def save_pretrained(self, folder: str | Path, **kwargs) -> None:
        self.encoder.save_pretrained(folder, safe_serialization=True)
        save_file({k: v.contiguous() for k, v in self.classifier.state_dict().items()}, Path(folder) / MEAN_HEAD_FILE)


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of each sequence's token vectors, padding masked out: (batch, seq, hidden) -> (batch, hidden)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


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

    def embedded(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model.base_model(**batch).last_hidden_state.float()  # (batch, seq, hidden)
        return mean_pooled(hidden, batch["attention_mask"])

    encodings = _tokenize_texts(tokenizer, unique, max_length)
    return _infer(model, tokenizer, encodings, batch_size, (model.config.hidden_size,), embedded)[inverse]


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
    calibration: Calibration | None = None,
    priors: PairPriors | None = None,
    legacy_user_counts: tuple | None = None,
) -> np.ndarray:
    """Predicted click-through rates in (0, 1), shape (pairs,). Without priors every ad counts as cold and
    every user as one with no impressions yet; without a calibration the logit's sigmoid. The served code of
    versions registered before tasks/output_layer.py passes (ad ids, (user clicks, impressions)) instead of
    priors: read as such."""
    if priors is not None and not isinstance(priors, PairPriors):
        priors = PairPriors(len(user_texts), legacy_user_counts, None, list(priors))
    elif priors is None and legacy_user_counts is not None:
        priors = PairPriors(len(user_texts), legacy_user_counts)
    calibration = calibration or Calibration()
    if calibration.uses_logit:
        logits = predict_logits(model, tokenizer, user_texts, ad_texts, max_length, batch_size)
    else:  # the layer ignores the logit (step 0 kept): the cross-encoder need not run
        logits = np.zeros(len(user_texts), dtype=np.float32)
    return calibration.apply(logits, priors)
