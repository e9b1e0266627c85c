"""The semantic match: how close a user's text and an ad's text are in the pretrained encoder's own
embedding space, zero-shot: the cosine of their mean-pooled, normalised embeddings, which is what a
sentence-embedding model such as all-MiniLM-L6-v2 was trained to make meaningful (on a billion sentence
pairs). It is a term of the output layer (tasks/output_layer.py, weights fitted on validation), and for an
ad never shown before it is the text's whole say.

Fine-tuning first tunes this encoder on the training clicks (tune_match_encoder: each clicked ad against the
other ads of its batch, a bi-encoder encodes each text once, far cheaper per pair than the cross-encoder),
then freezes it; it is saved beside the fine-tuned cross-encoder (MATCH_FOLDER): the served model reads the
match as it was fitted. The served model imports this module (tasks/ctr_pyfunc.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from tasks.model import embed_texts, mean_pooled, quiet_transformers
from tasks.output_layer import MATCH_COLUMN

MATCH_FOLDER = "match_encoder"  # inside a saved model: the match's encoder, as fitted


@dataclass
class MatchEncoder:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    batch_size: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length mean-pooled embeddings, shape (texts, hidden); identical texts encoded once."""
        vectors = embed_texts(self.model, self.tokenizer, texts, self.max_length, self.batch_size)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def match(self, user_texts: Sequence[str], ad_texts: Sequence[str]) -> np.ndarray:
        """The cosine of each (user text, ad text) pair, shape (pairs,), in [-1, 1]."""
        if len(user_texts) == 0:
            return np.empty(0, dtype=np.float32)
        return np.einsum("ij,ij->i", self.embed(user_texts), self.embed(ad_texts))


@dataclass(frozen=True)
class MatchTuning:
    """How tune_match_encoder trains (settings.training.match_*)."""

    epochs: int
    batch_size: int  # clicks per step: each one's negatives are the other clicks' ads
    learning_rate: float
    scale: float  # cosine x scale are the softmax's logits: a cosine spans [-1, 1], too flat a softmax alone
    warmup_ratio: float
    seed: int


def tune_match_encoder(encoder: MatchEncoder, clicks: pl.DataFrame, tuning: MatchTuning) -> list[float]:
    """Fine-tune the encoder on clicked (user_text, ad_text) pairs with in-batch negatives, then freeze it
    again; returns each step's loss. Each click's user must pick its ad among the batch's ads (softmax over
    scale x cosine, the multiple-negatives ranking loss of sentence-transformers): the within-user choice
    rerank makes. Another click of the same user, or the same ad clicked twice, is masked, not a negative."""
    if tuning.epochs == 0 or clicks.height < 2:
        return []
    model, tokenizer = encoder.model, encoder.tokenizer
    device = next(model.parameters()).device
    users, ads = clicks["user_text"].to_list(), clicks["ad_text"].to_list()
    # who and what: the ids (the texts where pairs carry none)
    user_ids = clicks["user_id" if "user_id" in clicks.columns else "user_text"].to_numpy()
    ad_ids = clicks["ad_id" if "ad_id" in clicks.columns else "ad_text"].to_numpy()
    steps = math.ceil(clicks.height / tuning.batch_size) * tuning.epochs
    model.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=tuning.learning_rate)
    schedule = get_linear_schedule_with_warmup(optimizer, int(tuning.warmup_ratio * steps), steps)
    generator, losses = torch.Generator().manual_seed(tuning.seed), []

    def embed(texts: list[str]) -> torch.Tensor:  # (texts, hidden), unit length, with gradients
        batch = tokenizer(texts, padding=True, truncation=True, max_length=encoder.max_length, return_tensors="pt")
        batch = batch.to(device)
        return torch.nn.functional.normalize(
            mean_pooled(model(**batch).last_hidden_state, batch["attention_mask"]), dim=-1
        )

    for _ in range(tuning.epochs):
        order = torch.randperm(clicks.height, generator=generator).numpy()
        for start in range(0, len(order), tuning.batch_size):
            index = order[start : start + tuning.batch_size]
            if len(index) < 2:  # a lone click has no negative
                continue
            logits = tuning.scale * embed([users[i] for i in index]) @ embed([ads[i] for i in index]).T
            same = (user_ids[index, None] == user_ids[None, index]) | (ad_ids[index, None] == ad_ids[None, index])
            np.fill_diagonal(same, False)
            logits = logits.masked_fill(torch.from_numpy(same).to(device), -torch.inf)
            loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(index), device=device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    model.requires_grad_(False)
    model.eval()
    return losses


def with_match(pairs: pl.DataFrame, encoder: MatchEncoder | None) -> pl.DataFrame:
    """The pairs with MATCH_COLUMN from their user_text and ad_text; as they are without an encoder."""
    if encoder is None:
        return pairs
    match = encoder.match(pairs["user_text"].to_list(), pairs["ad_text"].to_list())
    return pairs.with_columns(pl.Series(MATCH_COLUMN, match, dtype=pl.Float64))


def load_match_encoder(path: str | Path, device: torch.device, max_length: int, batch_size: int) -> MatchEncoder:
    """The encoder at path (a base model folder, or a saved model's MATCH_FOLDER), frozen, in eval mode."""
    with quiet_transformers():
        model = AutoModel.from_pretrained(str(path), use_safetensors=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    model.requires_grad_(False)
    return MatchEncoder(model, tokenizer, max_length, batch_size)


def saved_match_encoder(
    model_dir: str | Path, device: torch.device, max_length: int, batch_size: int
) -> MatchEncoder | None:
    """The match encoder saved with a model; None for a model without one (no match term)."""
    folder = Path(model_dir) / MATCH_FOLDER
    return load_match_encoder(folder, device, max_length, batch_size) if folder.is_dir() else None


def save_match_encoder(encoder: MatchEncoder, model_dir: str | Path) -> None:
    """Save the (frozen) encoder and its tokenizer into model_dir/MATCH_FOLDER, in safetensors."""
    folder = Path(model_dir) / MATCH_FOLDER
    with quiet_transformers():
        encoder.model.save_pretrained(folder, safe_serialization=True)
    encoder.tokenizer.save_pretrained(folder)
